"""The released checkpoint format: reading ACE_LoRA.pt onto the right layers, exact round trips,
clear errors for foreign or corrupt files.

The released file is looked up as tests/_released.py says: $ACE_LORA_RELEASED, else
../shared/reference beside the repository, else the copy kept in tests/data (its bytes
checked against the published SHA-256), so these tests run in any clone.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import os
import warnings
from pathlib import Path

import pytest
import torch

from ace_model import ACELoRA
from ace_model.checkpoint import CheckpointError

from _corrupt import flip_a_bit_in_a_stored_tensor
from _released import CANONICAL, RELEASED_SHA256, VENDORED, released_path

RELEASED = released_path()

needs_released = pytest.mark.skipif(not RELEASED.is_file(), reason=f"released checkpoint not found at {RELEASED}")


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_the_copy_kept_with_the_tests_is_the_published_file():
    # tests/data/ACE_LoRA.pt stands in where the workplace's copy is not beside the clone: its
    # bytes are the published ones (and, where the workplace's copy is here, the same bytes).
    assert _sha256(VENDORED) == RELEASED_SHA256
    assert (VENDORED.parent / "LICENSE-ACE-LoRA.txt").read_text().startswith("MIT License")
    if CANONICAL.is_file():
        assert _sha256(CANONICAL) == RELEASED_SHA256


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tree(a, b, where="checkpoint"):
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            _assert_same_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where  # bit for bit (no NaNs in these files)
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def biomedclip():
    return ACELoRA.from_config("biomedclip")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(5)
    return ACELoRA.from_config("tiny")


@needs_released
def test_released_file_is_the_expected_one():
    assert _sha256(RELEASED) == RELEASED_SHA256


@needs_released
def test_released_weights_land_on_the_right_layers(biomedclip):
    model = copy.deepcopy(biomedclip)
    metadata = model.load_reference_checkpoint(RELEASED)
    assert metadata["loss_type"] == "clip_loss_ace_hgat" and metadata["r"] == 4
    weights = _load(RELEASED)["weights"]
    for index in range(12):
        for p, projection in enumerate(("q_proj", "k_proj", "v_proj")):
            text = weights[f"layer_{index}"][projection]
            vision = weights[f"layer_{12 + index}"][projection]
            assert torch.equal(model.text_lora[index].lora_a[p], text["w_lora_A"])
            assert torch.equal(model.text_lora[index].lora_b[p], text["w_lora_B"])
            assert torch.equal(model.image_lora[index].lora_a[p], vision["w_lora_A"])
            assert torch.equal(model.image_lora[index].lora_b[p], vision["w_lora_B"])
    assert torch.equal(model.image_hgnn.edge_adapter.down.weight, weights["img_edge_adapter"]["down.weight"])
    assert torch.equal(model.text_hgnn.node_adapter.up.bias, weights["text_node_adapter"]["up.bias"])
    assert abs(model.logit_scale.item() - 78.35) < 0.01
    # The trained factors differ between towers: a text/vision swap would be caught above.
    assert not torch.equal(weights["layer_0"]["q_proj"]["w_lora_B"], weights["layer_12"]["q_proj"]["w_lora_B"])


@needs_released
def test_released_round_trip_is_exact_and_stable(biomedclip, tmp_path):
    model = copy.deepcopy(biomedclip)
    model.load_reference_checkpoint(RELEASED)
    first, second, third = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    model.save_reference_checkpoint(first)
    _assert_same_tree(_load(RELEASED), _load(first))
    model.save_reference_checkpoint(second)
    assert _sha256(first) == _sha256(second)
    # Reloading our own file into a fresh model and saving again gives the same bytes.
    other = copy.deepcopy(biomedclip)
    other.load_reference_checkpoint(first)
    other.save_reference_checkpoint(third)
    assert _sha256(first) == _sha256(third)


def test_tiny_round_trip_and_default_metadata(tiny, tmp_path):
    source = copy.deepcopy(tiny)
    with torch.no_grad():
        for param in source.trainable_parameters():
            param.add_(torch.randn_like(param))
    path = tmp_path / "tiny.pt"
    source.save_reference_checkpoint(path)
    blob = _load(path)
    assert blob["metadata"] == {"r": 4, "topk": 5, "k_nearest": 5, "params": ["q", "k", "v"],
                                "position": "all", "loss_type": "clip_loss_ace_hgnn"}
    layers = len(tiny.text_lora) + len(tiny.image_lora)
    assert [k for k in blob["weights"] if k.startswith("layer_")] == [f"layer_{i}" for i in range(layers)]
    target = copy.deepcopy(tiny)
    target.load_reference_checkpoint(path)
    for (name, a), (_, b) in zip(source.named_trainable_parameters(), target.named_trainable_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_default_metadata_records_the_models_own_rank_and_k(tmp_path):
    """A model never loaded from a file records its own r, topk and k_nearest: the tiny model's rank 4 and k 5 are
    the defaults, so a save that wrote those constants passed every other test, and its file was then refused by the
    model that wrote it ("metadata['r'] is 4, this model needs 2")."""
    from ace_model.model import build_base_model

    torch.manual_seed(3)
    model = ACELoRA(build_base_model("tiny"), "tiny", rank=2, topk=3)
    path = tmp_path / "r2.pt"
    model.save_reference_checkpoint(path)
    assert _load(path)["metadata"] == {"r": 2, "topk": 3, "k_nearest": 3, "params": ["q", "k", "v"],
                                       "position": "all", "loss_type": "clip_loss_ace_hgnn"}
    model.load_reference_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"metadata\['r'\] is 2, this model needs 4"):
        ACELoRA.from_config("tiny").load_reference_checkpoint(path)


def test_weights_are_saved_as_float32_from_a_model_of_another_dtype(tiny, tmp_path):
    """The released format holds float32 tensors: a float64 model (as the tests' reference comparisons build)
    writes its weights rounded to float32, every entry, not its own dtype; every other test saved a float32
    model, where a writer that kept the parameters' dtype wrote the same file."""
    model = copy.deepcopy(tiny).double()
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param))
    path = tmp_path / "fp64.pt"
    model.save_reference_checkpoint(path)
    weights = _load(path)["weights"]
    stored = [t for index in range(len(model.text_lora) + len(model.image_lora))
              for pair in weights[f"layer_{index}"].values() for t in pair.values()]
    stored += [t for key in ("img_edge_adapter", "img_node_adapter", "text_edge_adapter", "text_node_adapter")
               for t in weights[key].values()] + [weights["logit_scale"]]
    assert len(stored) == 6 * (len(model.text_lora) + len(model.image_lora)) + 4 * 4 + 1
    assert {t.dtype for t in stored} == {torch.float32}
    assert torch.equal(weights["layer_0"]["q_proj"]["w_lora_A"], model.text_lora[0].lora_a[0].float())


def test_metadata_given_to_the_writer_is_the_one_saved(tiny, tmp_path):
    """save_reference_checkpoint's metadata argument comes first, before the metadata of a file loaded into the model
    and the defaults; no caller in the package passes one, so a writer that ignored it passed every test."""
    from ace_model.checkpoint import default_metadata, save_reference_checkpoint

    model = copy.deepcopy(tiny)
    given = {**default_metadata(model), "loss_type": "clip_loss_ace_hgat", "note": "given"}
    for loaded in (False, True):
        if loaded:
            model.save_reference_checkpoint(tmp_path / "plain.pt")
            model.load_reference_checkpoint(tmp_path / "plain.pt")
        save_reference_checkpoint(model, tmp_path / "given.pt", metadata=given)
        assert _load(tmp_path / "given.pt")["metadata"] == given


def test_save_into_an_open_file_writes_the_same_checkpoint(tiny, tmp_path):
    """The training loop writes through its own temp file by handing over the open file."""
    tiny.save_reference_checkpoint(tmp_path / "by_path.pt")
    with open(tmp_path / "by_handle.pt", "wb") as handle:
        tiny.save_reference_checkpoint(handle)
    _assert_same_tree(_load(tmp_path / "by_handle.pt"), _load(tmp_path / "by_path.pt"))
    assert sorted(os.listdir(tmp_path)) == ["by_handle.pt", "by_path.pt"]  # no temp file left


@pytest.mark.parametrize("loss_type", ["clip_loss_ace_hgnn", "clip_loss_ace_hgat"])
def test_both_loss_type_spellings_load(tiny, tmp_path, loss_type):
    model = copy.deepcopy(tiny)
    path = tmp_path / "c.pt"
    model.save_reference_checkpoint(path)
    blob = _load(path)
    blob["metadata"]["loss_type"] = loss_type
    torch.save(blob, path)
    assert model.load_reference_checkpoint(path)["loss_type"] == loss_type


def _corrupt(tiny, tmp_path, edit):
    """A file of weights other than ``tiny``'s, then edited. Other weights: a failed load must leave
    the model unchanged, and a load that copied some entries before refusing a later one would go
    unseen if they held the values the model already has."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(1.0)  # logit_scale stays positive
    path = tmp_path / "bad.pt"
    model.save_reference_checkpoint(path)
    blob = _load(path)
    edit(blob)
    torch.save(blob, path)
    return path


def test_wrong_shape_names_the_key_and_shapes_and_changes_nothing(tiny, tmp_path):
    def edit(blob):
        blob["weights"]["layer_2"]["k_proj"]["w_lora_A"] = torch.zeros(4, 768)
        blob["weights"]["layer_3"]["v_proj"]["w_lora_B"] = torch.zeros(1, 1)  # later: not reported first
    path = _corrupt(tiny, tmp_path, edit)
    model = copy.deepcopy(tiny)
    before = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
    with pytest.raises(CheckpointError,
                       match=r"\['layer_2'\]\['k_proj'\]\['w_lora_A'\]: expected shape \(4, 64\), found \(4, 768\)"):
        model.load_reference_checkpoint(path)
    for name, param in model.named_trainable_parameters():
        assert torch.equal(param, before[name]), f"{name} changed by a failed load"


@pytest.mark.parametrize("key", ["w_lora_A", "w_lora_B"])
def test_a_transposed_factor_is_refused_naming_both_shapes_and_changes_nothing(tiny, tmp_path, key):
    """A factor stored transposed ([in, r] for w_lora_A, as nn.Linear's weight is laid out) holds as many values as
    the right one: a check of the number of values alone let it through to the copy, which failed (or, were the
    two sides equal, loaded it transposed) after the earlier layers had been copied. The last layer's is."""
    last = len(tiny.text_lora) + len(tiny.image_lora) - 1

    def edit(blob):
        blob["weights"][f"layer_{last}"]["v_proj"][key] = blob["weights"][f"layer_{last}"]["v_proj"][key].t().clone()
    path = _corrupt(tiny, tmp_path, edit)
    model = copy.deepcopy(tiny)
    before = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
    factor = model.image_lora[-1].lora_a if key == "w_lora_A" else model.image_lora[-1].lora_b
    rows, columns = factor.shape[1:]
    with pytest.raises(CheckpointError, match=rf"\['layer_{last}'\]\['v_proj'\]\['{key}'\]: expected shape "
                                              rf"\({rows}, {columns}\), found \({columns}, {rows}\)"):
        model.load_reference_checkpoint(path)
    for name, param in model.named_trainable_parameters():
        assert torch.equal(param, before[name]), f"{name} changed by a failed load"


def test_missing_and_foreign_keys_are_named(tiny, tmp_path):
    path = _corrupt(tiny, tmp_path, lambda blob: blob["weights"]["img_node_adapter"].pop("up.bias"))
    with pytest.raises(CheckpointError, match=r"img_node_adapter.*missing key 'up.bias'"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)
    # Each top-level entry of weights is asked for: a layer (one in the middle), an adapter, logit_scale (read apart).
    for key in ("layer_1", "text_node_adapter", "logit_scale"):
        path = _corrupt(tiny, tmp_path, lambda blob: blob["weights"].pop(key))
        with pytest.raises(CheckpointError, match=rf"bad\.pt: weights: missing key '{key}' \(found keys \["):
            copy.deepcopy(tiny).load_reference_checkpoint(path)
    # So is each key below a layer: a projection, and a projection's factor.
    for edit, where in ((lambda w: w["layer_2"].pop("k_proj"), r"weights\['layer_2'\]: missing key 'k_proj'"),
                        (lambda w: w["layer_0"]["v_proj"].pop("w_lora_B"),
                         r"weights\['layer_0'\]\['v_proj'\]: missing key 'w_lora_B'")):
        path = _corrupt(tiny, tmp_path, lambda blob: edit(blob["weights"]))
        with pytest.raises(CheckpointError, match=rf"bad\.pt: {where} \(found keys \["):
            copy.deepcopy(tiny).load_reference_checkpoint(path)
    path = _corrupt(tiny, tmp_path, lambda blob: blob["weights"].update(layer_99={}))
    # A layer beyond the model's is named with the layers it has (not only as one more unexpected entry).
    with pytest.raises(CheckpointError, match=r"unexpected key weights\['layer_99'\]: this model has 4 attention "
                                              r"layers \(layer_0\.\.layer_3\)$"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)
    for key, value, want in (("r", 8, 4), ("topk", 3, 5), ("position", "last", "all")):
        path = _corrupt(tiny, tmp_path, lambda blob: blob["metadata"].update({key: value}))
        with pytest.raises(CheckpointError, match=rf"metadata\['{key}'\] is {value!r}, this model needs {want!r}"):
            copy.deepcopy(tiny).load_reference_checkpoint(path)
    path = _corrupt(tiny, tmp_path, lambda blob: blob["metadata"].update(loss_type="clip_loss"))
    with pytest.raises(CheckpointError, match="loss_type"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)


@pytest.mark.parametrize("where,edit", [
    (r"weights\['layer_0'\]: unexpected key 'o_proj' \(this model adapts \['q_proj', 'k_proj', 'v_proj'\]\)",
     lambda w: w["layer_0"].update(o_proj={"w_lora_A": torch.zeros(4, 64), "w_lora_B": torch.zeros(64, 4)})),
    (r"weights\['layer_1'\]\['q_proj'\]: unexpected key 'lora_magnitude' \(a LoRA pair is",
     lambda w: w["layer_1"]["q_proj"].update(lora_magnitude=torch.ones(64))),
    (r"weights\['img_edge_adapter'\]: unexpected key 'norm.weight' \(an adapter is",
     lambda w: w["img_edge_adapter"].update({"norm.weight": torch.ones(64)})),
    (r"weights: unexpected key 'img_proj_adapter' \(this model's entries are",
     lambda w: w.update(img_proj_adapter={"down.weight": torch.zeros(16, 64)})),
])
def test_entries_the_model_would_drop_are_refused(tiny, tmp_path, where, edit):
    """Loading would drop them, and the next save lose them: refused, naming the key."""
    model = copy.deepcopy(tiny)
    before = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
    path = _corrupt(tiny, tmp_path, lambda blob: edit(blob["weights"]))
    with pytest.raises(CheckpointError, match=rf"{where}.*; loading would drop it$"):
        model.load_reference_checkpoint(path)
    for name, param in model.named_trainable_parameters():
        assert torch.equal(param, before[name]), f"{name} changed by a failed load"


def _nested_rows(rows: int, width: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's: nested tensors are a prototype
        return torch.nested.nested_tensor([torch.ones(width)] * rows)


@pytest.mark.parametrize("where,edit", [
    (r"weights\['logit_scale'\]: 1 of 1 values are not finite \(NaN or inf\); a trained checkpoint has none",
     lambda blob: blob["weights"].update(logit_scale=torch.tensor(float("nan")))),
    (r"weights\['img_node_adapter'\]\['up.bias'\]: 1 of 64 values are not finite",
     lambda blob: blob["weights"]["img_node_adapter"]["up.bias"].__setitem__(3, float("inf"))),
    (r"weights\['layer_2'\]\['v_proj'\]\['w_lora_B'\]: 2 of \d+ values are not finite",
     lambda blob: blob["weights"]["layer_2"]["v_proj"]["w_lora_B"][0, :2].fill_(float("nan"))),
    # finite in the file's float64, infinite in the model's float32
    (r"weights\['logit_scale'\]: 1 of 1 values are not finite \(NaN or inf\) in float32; a trained",
     lambda blob: blob["weights"].update(logit_scale=torch.tensor(1e40, dtype=torch.float64))),
    (r"weights\['layer_0'\]\['q_proj'\]\['w_lora_A'\]: 256 of 256 values are not finite \(NaN or inf\) in float32",
     lambda blob: blob["weights"]["layer_0"]["q_proj"].update(
         w_lora_A=torch.full((4, 64), 1e300, dtype=torch.float64))),
    (r"weights\['logit_scale'\] is -5\.0; expected a positive multiplier",
     lambda blob: blob["weights"].update(logit_scale=torch.tensor(-5.0))),
    (r"weights\['logit_scale'\] is 0\.0; expected a positive multiplier",
     lambda blob: blob["weights"].update(logit_scale=torch.tensor(0.0))),
    # positive in the file's float64, 0 in the model's float32
    (r"weights\['logit_scale'\] is 1e-50 \(0\.0 in float32\); expected a positive multiplier",
     lambda blob: blob["weights"].update(logit_scale=torch.tensor(1e-50, dtype=torch.float64))),
    (r"weights\['layer_0'\]\['q_proj'\]\['w_lora_A'\]: expected a floating-point tensor, found torch\.int64",
     lambda blob: blob["weights"]["layer_0"]["q_proj"].update(w_lora_A=torch.ones(4, 64, dtype=torch.int64))),
    (r"weights: unexpected key 7 \(this model's entries are",
     lambda blob: blob["weights"].update({7: torch.zeros(2)})),
    (r"metadata\['params'\] is 'qkv', this model adapts \['q', 'k', 'v'\]",
     lambda blob: blob["metadata"].update(params="qkv")),
    # LoRA on q and v only (common elsewhere): named by the metadata, which lists fewer than this model adapts.
    (r"metadata\['params'\] is \['q', 'v'\], this model adapts \['q', 'k', 'v'\]",
     lambda blob: blob["metadata"].update(params=["q", "v"])),
    (r"bad\.pt: 'metadata' must be a dict, found str$", lambda blob: blob.update(metadata="r=4")),
    # A comparison with no single truth raised torch's RuntimeError, naming neither the file nor the entry.
    (r"metadata\['r'\] is tensor\(\[4, 4\]\), this model needs 4",
     lambda blob: blob["metadata"].update(r=torch.tensor([4, 4]))),
    (r"metadata\['topk'\] is tensor\(\[5, 5\]\), this model needs 5",
     lambda blob: blob["metadata"].update(topk=torch.tensor([5, 5]))),
    (r"bad\.pt: weights: expected a dict with keys \['layer_0', 'layer_1', .*\], found list$",
     lambda blob: blob.update(weights=list(blob["weights"].values()))),
    (r"weights\['layer_0'\]\['q_proj'\]\['w_lora_A'\]: expected a tensor of shape \(4, 64\), found list$",
     lambda blob: blob["weights"]["layer_0"]["q_proj"].update(w_lora_A=[[0.0] * 64] * 4)),
    # A foreign file saved from a model built on the meta device has tensors without values.
    (r"weights\['layer_1'\]\['k_proj'\]\['w_lora_B'\]: a tensor without values \(device 'meta'\)",
     lambda blob: blob["weights"]["layer_1"]["k_proj"].update(w_lora_B=torch.empty(64, 4, device="meta"))),
    (r"weights\['logit_scale'\]: a tensor without values \(device 'meta'\)",
     lambda blob: blob["weights"].update(logit_scale=torch.empty((), device="meta"))),
    (r"weights\['layer_0'\]\['q_proj'\]\['w_lora_A'\]: expected a dense tensor of shape \(4, 64\), found a nested",
     lambda blob: blob["weights"]["layer_0"]["q_proj"].update(w_lora_A=_nested_rows(4, 64))),
])
def test_corrupt_values_and_keys_are_refused_naming_them(tiny, tmp_path, where, edit):
    """A NaN or infinite weight (training never writes one), a multiplier <= 0 as the model would hold
    it (a negative one inverts every ranking, 0 ties them all), an integer tensor, a key that is no
    string, params given as a string: one CheckpointError each, naming the entry, and the model
    unchanged (the multiplier and the adapters are checked after the LoRA layers: nothing is copied
    before the last check)."""
    model = copy.deepcopy(tiny)
    before = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
    path = _corrupt(tiny, tmp_path, edit)
    with pytest.raises(CheckpointError, match=where):
        model.load_reference_checkpoint(path)
    for name, param in model.named_trainable_parameters():
        assert torch.equal(param, before[name]), f"{name} changed by a failed load"


def test_a_checkpoint_of_a_smaller_model_says_so(tiny, tmp_path):
    path = _corrupt(tiny, tmp_path, lambda blob: [blob["weights"].pop(f"layer_{i}") for i in (2, 3)])
    with pytest.raises(CheckpointError, match=r"LoRA weights for 2 attention layers, this model has 4 \(a checkpoint "
                                              r"of another model configuration\? the command line's --model\)"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)
    # A gap in the layers is no configuration: the first missing one is named.
    path = _corrupt(tiny, tmp_path, lambda blob: blob["weights"].pop("layer_1"))
    with pytest.raises(CheckpointError, match=r"weights: missing key 'layer_1'"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)


def test_a_sparse_tensor_is_refused_naming_it(tiny, tmp_path):
    path = _corrupt(tiny, tmp_path, lambda blob: blob["weights"]["layer_0"]["q_proj"].update(
        w_lora_A=blob["weights"]["layer_0"]["q_proj"]["w_lora_A"].to_sparse()))
    with pytest.raises(CheckpointError, match=r"\['layer_0'\]\['q_proj'\]\['w_lora_A'\]: expected a dense tensor, "
                                              r"found layout torch\.sparse_coo"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)


def test_a_top_level_entry_beyond_weights_and_metadata_is_refused(tiny, tmp_path):
    # As one level down: loading would drop it, and the next save lose it.
    path = _corrupt(tiny, tmp_path, lambda blob: blob.update(optimizer={"lr": 1e-3}))
    with pytest.raises(CheckpointError, match=r"unexpected key 'optimizer' \(a released checkpoint holds "
                                              r"\['weights', 'metadata'\]\); loading would drop it"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)


def test_a_training_state_is_named_as_one(tiny, tmp_path):
    from ace_model.training import STATE_FORMAT

    path = tmp_path / "state-00000012.pt"
    torch.save({"format": STATE_FORMAT, "version": 2, "step": 12, "trainable": {}}, path)
    with pytest.raises(CheckpointError, match=r"state-00000012\.pt: a training state \(for resuming\), not a "
                                              r"released-format checkpoint; the weights of that step are in "
                                              r"ace_lora-00000012\.pt beside it"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)


@needs_released
def test_released_file_does_not_fit_the_tiny_model(tiny):
    # Its 24 layers, named as another model's (not "unexpected key layer_4").
    with pytest.raises(CheckpointError, match=r"ACE_LoRA\.pt: LoRA weights for 24 attention layers, this model has 4 "
                                              r"\(a checkpoint of another model configuration\?"):
        copy.deepcopy(tiny).load_reference_checkpoint(RELEASED)


class _NotAllowed:
    pass


def test_unreadable_file_is_reported(tiny, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)
    # A file holding a class weights-only loading refuses: torch's paragraphs become one line.
    torch.save({"weights": collections.OrderedDict(), "metadata": {"x": _NotAllowed()}}, path)
    with pytest.raises(CheckpointError) as info:
        copy.deepcopy(tiny).load_reference_checkpoint(path)
    assert "\n" not in str(info.value) and "weights-only torch checkpoint (UnpicklingError: " in str(info.value)
    with pytest.raises(CheckpointError, match="missing.pt"):
        copy.deepcopy(tiny).load_reference_checkpoint(tmp_path / "missing.pt")


def test_a_flipped_bit_in_a_stored_tensor_is_refused(tiny, tmp_path):
    """torch.load does not check the zip's CRC-32s: a bit flipped in a tensor would load as another
    weight; the loader checks them first and changes nothing."""
    path = tmp_path / "ace_lora.pt"
    tiny.save_reference_checkpoint(path)
    model = copy.deepcopy(tiny)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    member = flip_a_bit_in_a_stored_tensor(path)
    with pytest.raises(CheckpointError, match=f"ace_lora.pt: .* its member '{member}' fails its CRC-32 check"):
        model.load_reference_checkpoint(path)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_flipped_bit_after_an_empty_member_is_refused(tiny, tmp_path):
    """An empty member's CRC-32 is 0, as is every member's in a file saved without CRCs: a check that stopped at the
    first such member (not only skipped it) left every later member unchecked, and the file of the test above holds
    no empty tensor. Here an empty tensor is stored first; the flipped bit in the weights after it is found."""
    import zipfile

    path = tmp_path / "ace_lora.pt"
    tiny.save_reference_checkpoint(path)
    torch.save({"empty": torch.zeros(0), **_load(path)}, path)
    with zipfile.ZipFile(path) as archive:
        assert [i.CRC for i in archive.infolist() if i.filename.endswith("/data/0")] == [0]
    member = flip_a_bit_in_a_stored_tensor(path)
    assert not member.endswith("/data/0")
    with pytest.raises(CheckpointError, match=f"ace_lora.pt: .* its member '{member}' fails its CRC-32 check"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)


def test_a_file_saved_without_crcs_loads(tiny, tmp_path):
    """torch can save without computing CRC-32s (it writes 0 for each member) and loads such
    files: so does the loader (nothing to check there)."""
    import torch.utils.serialization

    path = tmp_path / "ace_lora.pt"
    # Set and put back by assignment: torch's config object does not survive monkeypatch's undo.
    save_config = torch.utils.serialization.config.save
    before = save_config.compute_crc32
    save_config.compute_crc32 = False
    try:
        tiny.save_reference_checkpoint(path)
    finally:
        save_config.compute_crc32 = before
    import zipfile

    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is not None  # zipfile's own check calls it corrupt
    model = copy.deepcopy(tiny)
    model.load_reference_checkpoint(path)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), tiny.parameters(), strict=True))


def test_a_file_that_holds_no_dict_is_named(tiny, tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a dict with keys \['weights', 'metadata'\], "
                                              r"found list$"):
        copy.deepcopy(tiny).load_reference_checkpoint(path)


def test_a_missing_file_or_a_directory_is_not_called_corrupt(tmp_path):
    """read_model_file says "cannot be read" of a file's content only: a missing file or a directory
    raises as the load raised it."""
    from ace_model.checkpoint import read_model_file

    for path, error in ((tmp_path / "missing.pt", FileNotFoundError), (tmp_path, IsADirectoryError)):
        with pytest.raises(error):
            read_model_file(lambda: torch.load(path, weights_only=True), CheckpointError, str(path), "a checkpoint")


def test_an_error_is_cut_to_its_first_sentence_and_to_200_characters():
    from ace_model.checkpoint import first_line

    assert first_line(ValueError("Bad file. Torch explains at length.\nMore.")) == "ValueError: Bad file."
    # A sentence ends at a full stop and a space: not at the dot of a file name or a version number.
    assert first_line(RuntimeError("torch 2.14 cannot read /tmp/run/ace_lora.pt: bad header. Details.")) == \
        "RuntimeError: torch 2.14 cannot read /tmp/run/ace_lora.pt: bad header."
    assert first_line(ValueError("x" * 300)) == "ValueError: " + "x" * 197 + "..."
    assert first_line(ValueError("x" * 200)) == "ValueError: " + "x" * 200
    assert first_line(ValueError("x" * 201)) == "ValueError: " + "x" * 197 + "..."  # the first one cut
    assert first_line(KeyError()) == "KeyError"


def test_metadata_without_r_or_topk_loads_with_a_warning_and_saves_them(tiny, tmp_path):
    """A file whose metadata has no r and topk (every released-format writer records them) loaded without a word,
    though the model's k and rank were then checked against nothing, and a save wrote the gap back. It now loads
    with a warning naming them, and a save records the model's own. A file without k_nearest (the reference code's
    save_lora writes none) loads silently, as the released file does."""
    def without(*keys):
        return lambda blob: [blob["metadata"].pop(key) for key in keys]

    path = _corrupt(tiny, tmp_path, without("r", "topk"))
    model = copy.deepcopy(tiny)
    with pytest.warns(UserWarning, match=r"bad\.pt: its metadata records no 'r', 'topk' \(a released-format file "
                                         r"always does\), so they were not checked .*\(r=4, topk=5\)"):
        assert "topk" not in model.load_reference_checkpoint(path)
    saved = tmp_path / "saved.pt"
    model.save_reference_checkpoint(saved)
    assert _load(saved)["metadata"] == {**_load(path)["metadata"], "r": 4, "topk": 5}
    # The other recorded entries (what check_metadata checks) are named when missing too.
    path = _corrupt(tiny, tmp_path, without("params", "position", "loss_type"))
    with pytest.warns(UserWarning, match=r"its metadata records no 'params', 'position', 'loss_type' \("):
        copy.deepcopy(tiny).load_reference_checkpoint(path)
    path = _corrupt(tiny, tmp_path, without("k_nearest"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy.deepcopy(tiny).load_reference_checkpoint(saved)
        copy.deepcopy(tiny).load_reference_checkpoint(path)


def test_a_k_changed_after_a_load_is_the_one_saved(tiny, tmp_path):
    """The metadata of the file last loaded is written back, but with the model's own r and topk: a k
    set after the load was saved as the file's old one (topk 5), so the model refused its own file
    ("metadata['topk'] is 5, this model needs 3") and a topk-5 model took it silently."""
    model = copy.deepcopy(tiny)
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    model.save_reference_checkpoint(first)
    blob = _load(first)
    blob["metadata"]["loss_type"] = "clip_loss_ace_hgat"  # the released spelling, kept as loaded
    torch.save(blob, first)
    model.load_reference_checkpoint(first)
    model.image_hgnn.topk = model.text_hgnn.topk = 3
    model.save_reference_checkpoint(second)
    metadata = _load(second)["metadata"]
    assert metadata == {**blob["metadata"], "topk": 3} and list(metadata) == list(blob["metadata"])
    assert model.load_reference_checkpoint(second)["topk"] == 3
    with pytest.raises(CheckpointError, match=r"metadata\['topk'\] is 3, this model needs 5"):
        copy.deepcopy(tiny).load_reference_checkpoint(second)


def test_each_saved_tensor_is_a_copy_in_its_own_storage_as_in_the_released_file(tiny, tmp_path):
    """reference_weights gives copies, and the file holds one storage per tensor, as the released file does: the
    lora_b factors of a float32 model on the CPU were saved as views of the parameter without the clone (its .to is
    then no copy), which loaded with the right values but shared one storage per layer, and changed as the model
    trained on after the call."""
    from ace_model.checkpoint import reference_weights

    def tensors(tree):
        for value in tree.values():
            yield from tensors(value) if isinstance(value, dict) else [value]

    model = copy.deepcopy(tiny)
    weights = reference_weights(model)
    before = [t.clone() for t in tensors(weights)]
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(1.0)
    assert all(torch.equal(t, b) for t, b in zip(tensors(weights), before, strict=True))
    path = tmp_path / "tiny.pt"
    model.save_reference_checkpoint(path)
    for name, blob in (("saved", _load(path)), ("released", _load(RELEASED) if RELEASED.is_file() else None)):
        if blob is None:
            continue
        stored = list(tensors(blob["weights"]))
        assert len({t.untyped_storage().data_ptr() for t in stored}) == len(stored), name
        assert all(t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                   for t in stored), name
