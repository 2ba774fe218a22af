"""The ``ace-lora`` command line: ``train``, ``zero-shot`` and ``demo``.

Examples::

    ace-lora demo                                   # synthetic data, tiny model, CPU, under a minute
    ace-lora train --csv data.csv --out-dir runs/a  # the paper's recipe by default
    ace-lora zero-shot --csv test.csv --classes "Atelectasis,Cardiomegaly" \\
        --task multiclass --checkpoint runs/a/checkpoints/ace_lora-00001000.pt

Bad input ends with a one-line ``error: ...`` on stderr and exit status 2 (bad
arguments, data, checkpoints or training states: every ``ValueError``, which our own
checks raise, a missing file, and a package of the ``model`` extra not installed) or 1 (an
expected failure while running: a non-finite loss, ranks that disagree, an OS error such as a
full disk). Anything else is a bug or
a resource failure (e.g. CUDA out of memory) and ends with its full traceback (exit 1).
Ctrl-C ends with one line and exit 130; what is on disk is the last complete state
(``train --resume auto`` continues from it exactly). ``ACE_LORA_DEBUG=1`` raises the one-line
errors instead (the traceback in place of the line, status 1), but for argparse's own (an unknown
flag, a value it cannot parse), which print the usage and exit 2 either way. Errors from ``TrainConfig`` checks
name the flag (``--chunk-size``), not the field.

JSON output (``train``'s summary, ``zero-shot``'s metrics and ``--output``, the demo's
summary) is strict JSON: an undefined metric (AUROC of a class without positives or
negatives) is written as ``null``, never as a bare ``NaN``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from ace_model.model import CONFIG_NAMES, TEXT_ATTENTION  # loaded with the package already
from ace_model.training import LOSS_SCOPES

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# The seed of train's model construction (TrainConfig.seed's default) and of zero-shot's,
# so that zero-shot without --pretrained rebuilds the frozen towers that training used.
DEFAULT_SEED = 1

# CLI flag (argparse dest) -> TrainConfig field.
_TRAIN_FLAGS = {
    "csv": "csv", "image_root": "image_root", "out_dir": "out_dir", "model": "model",
    "pretrained": "pretrained", "init_checkpoint": "init_checkpoint", "epochs": "epochs",
    "max_steps": "max_steps", "batch_size": "batch_size", "chunk_size": "chunk_size", "lr": "lr",
    "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs", "warmup_steps": "warmup_steps",
    "seed": "seed", "use_labels": "use_labels", "device": "device", "precision": "precision",
    "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep_checkpoints", "resume": "resume",
    "num_workers": "num_workers", "progress": "progress", "cuda_graph": "cuda_graph",
    "recompute": "recompute", "overwrite": "overwrite", "text_attention": "text_attention",
    "loss_scope": "loss_scope",
}


class CLIError(Exception):
    """Bad input reported to the user without a traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ace-lora", description="ACE-LoRA training and zero-shot evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train ACE-LoRA on a CSV of image path, report text and labels",
                           description="Train the LoRA factors, ACE-HGNN adapters and logit multiplier. "
                                       "Defaults are the paper's recipe: AdamW lr 1e-3, weight decay 1e-2, "
                                       "cosine schedule with one epoch of warm-up, 40 epochs, batch 64.")
    train.add_argument("--csv", required=True, help="CSV with columns image, text and label columns")
    train.add_argument("--image-root", help="base of relative image paths (default: the CSV's folder)")
    train.add_argument("--out-dir", default="runs/ace-lora",
                       help="metrics.jsonl and checkpoints/ go here (default: %(default)s)")
    train.add_argument("--model", choices=CONFIG_NAMES, default="biomedclip",
                       help="the architecture; 'tiny' (2 layers of width 64) is for tests and demos "
                            "(default: %(default)s)")
    train.add_argument("--pretrained", help="local open_clip checkpoint file or HF-format directory")
    train.add_argument("--init-checkpoint", help="start from a released-format ACE-LoRA checkpoint")
    train.add_argument("--epochs", type=int, default=40, help="passes over the data (default: %(default)s)")
    train.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule spans them)")
    train.add_argument("--batch-size", type=int, default=64,
                       help="global batch size (with several processes each takes an equal slice; "
                            "default: %(default)s)")
    train.add_argument("--loss-scope", choices=LOSS_SCOPES, default="global",
                       help="with several processes: 'global', one loss over the global batch (every sample "
                            "meets every process's negatives; the loss one process would compute); 'local', each "
                            "process's loss over its own slice, gradients averaged (the paper's multi-GPU runs: "
                            "batch 64 per GPU on 3 GPUs is --batch-size 192 --loss-scope local; default: "
                            "%(default)s)")
    train.add_argument("--chunk-size", type=int,
                       help="two-pass chunked step with chunks of this many samples (memory follows the chunk, "
                            "not the batch). Without dropout the gradients equal the one-pass step's for any "
                            "chunk size; with dropout each chunk draws its own masks (replayed exactly in pass "
                            "2), so another chunk size gives other, identically distributed masks")
    train.add_argument("--cuda-graph", action="store_true",
                       help="capture the training step once as a CUDA graph and replay it every step (CUDA, one "
                            "process, no --chunk-size): the same kernels and random streams, launched in one call "
                            "instead of thousands, for steps bound by the host's launch work")
    train.add_argument("--recompute", choices=("none", "mlp", "layer"), default="none",
                       help="what the backward reruns instead of keeping, for less activation memory with the "
                            "same losses and gradients: 'mlp', each MLP's LayerNorm, fc1 and GELU (the GELU "
                            "inputs are not kept; one more fc1 GEMM per layer); 'layer', each transformer layer "
                            "whole (only its input is kept, its dropout draws replayed; one more forward of the "
                            "towers; not with --cuda-graph); default: %(default)s")
    train.add_argument("--text-attention", choices=TEXT_ATTENTION, default="spec",
                       help="the text tower's CLS attention row: 'spec' (pre-softmax scores, BERT's attention "
                            "dropouts kept, as the spec describes) or 'reference-code' (masked softmax "
                            "probabilities, no attention dropouts: what the published code, and so the released "
                            "weights, computed); default: %(default)s")
    train.add_argument("--lr", type=float, default=1e-3,
                       help="AdamW's learning rate, the cosine schedule's peak (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW's weight decay (default: %(default)s)")
    train.add_argument("--warmup-epochs", type=float, default=1.0,
                       help="epochs of linear warm-up before the cosine decay (default: %(default)s)")
    train.add_argument("--warmup-steps", type=int, help="overrides --warmup-epochs")
    train.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help="seeds the model's construction (the frozen towers too, without --pretrained), "
                            "the data order and dropout (default: %(default)s)")
    train.add_argument("--no-labels", dest="use_labels", action="store_false",
                       help="plain CLIP loss instead of the label-guided InfoNCE (columns other than image "
                            "and text are then not read)")
    train.add_argument("--device", default="auto",
                       help="auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N (default: %(default)s)")
    train.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="auto: bf16 autocast on GPU, fp32 on CPU (default: %(default)s)")
    train.add_argument("--checkpoint-every", type=int, default=500,
                       help="steps between checkpoints (0: at the end only; default: %(default)s)")
    train.add_argument("--keep-checkpoints", type=int, default=2,
                       help="how many of this run's newest checkpoints stay; older ones are deleted once a newer "
                            "one is written (default: %(default)s)")
    train.add_argument("--resume", help="a state file, a run directory (or its checkpoints/latest), or 'auto' "
                                        "(latest in --out-dir)")
    train.add_argument("--num-workers", type=int, default=0,
                       help="DataLoader worker processes (default: %(default)s: the training process loads)")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    train.add_argument("--overwrite", action="store_true",
                       help="let this run replace another run's files in --out-dir (refused without it)")

    zero = sub.add_parser("zero-shot", help="prompt-ensemble zero-shot classification with accuracy and AUROC")
    zero.add_argument("--csv", required=True, help="CSV with an image column and one 0/1 column per class")
    zero.add_argument("--classes", help="comma-separated class names = label columns "
                                        "(default: every column but the image and text columns)")
    zero.add_argument("--task", choices=("multiclass", "binary", "multilabel"), default="multiclass",
                      help="multiclass and binary: one positive class per row (binary: two classes, the second "
                           "the positive one, whose probability the AUROC ranks); multilabel: any number "
                           "(default: %(default)s)")
    zero.add_argument("--image-column", default="image", help="the CSV's column of image paths (default: %(default)s)")
    zero.add_argument("--image-root", help="base of relative image paths (default: the CSV's folder)")
    zero.add_argument("--model", choices=CONFIG_NAMES, default=None,
                      help="default: the model --checkpoint was trained with (train records it), else biomedclip")
    zero.add_argument("--pretrained", help="local open_clip checkpoint file or HF-format directory")
    zero.add_argument("--checkpoint", help="released-format ACE-LoRA checkpoint (e.g. ACE_LoRA.pt)")
    zero.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    zero.add_argument("--logit-scale", default="base",
                      help="the multiplier of the similarities: 'base' (the frozen base model's, as the reference's "
                           "zero-shot scripts use: 100 for BiomedCLIP), 'learned' (the trained one in the "
                           "checkpoint) or a positive number; the multiclass and multilabel AUROCs depend on it "
                           "(default: %(default)s)")
    zero.add_argument("--text-attention", choices=TEXT_ATTENTION, default=None,
                       help="as train's flag; default: what --checkpoint was trained with (when it says), else "
                            "'spec'. The released ACE_LoRA.pt was trained by the published code: 'reference-code'")
    zero.add_argument("--seed", type=int, default=None,
                      help="seed of the model's construction: without --pretrained the frozen towers are "
                           "random weights, the same as train's with the same --seed (default: the seed "
                           "--checkpoint was trained with on random towers, else train's default)")
    zero.add_argument("--device", default="auto",
                      help="auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N (default: %(default)s)")
    zero.add_argument("--output", help="also write the metrics as JSON to this file")
    zero.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")

    demo = sub.add_parser("demo", help="train the tiny model on synthetic data and evaluate it (CPU, under a minute)")
    demo.add_argument("--out-dir", default="ace-lora-demo",
                      help="the demo's data, run and summary go here (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 300; --quick: 150)")
    demo.add_argument("--train-size", type=int, default=None, help="training samples (default 512; --quick: 256)")
    demo.add_argument("--test-size", type=int, default=None, help="test samples (default 200; --quick: 100)")
    demo.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    demo.add_argument("--lr", type=float, default=3e-3, help="default: %(default)s")
    demo.add_argument("--seed", type=int, default=DEFAULT_SEED, help="default: %(default)s")
    demo.add_argument("--quick", action="store_true",
                      help="a shortened demo (for tests): 150 steps, smaller sets, where not given explicitly")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    demo.add_argument("--overwrite", action="store_true",
                      help="write the demo into a non-empty --out-dir that holds no earlier demo")
    return parser


# ----------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------


def train_config_from_args(args: argparse.Namespace):
    """Map parsed ``train`` flags onto :class:`ace_model.training.TrainConfig`."""
    from ace_model.training import TrainConfig

    values = {}
    for dest, field in _TRAIN_FLAGS.items():  # every field is TrainConfig's (tests/test_cli.py checks it)
        value = getattr(args, dest, None)
        if value is None and dest not in ("csv",):
            continue
        values[field] = value
    return TrainConfig(**values)


def _subcommand_actions(command: str) -> list:
    parser = _parser()
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public accessor
        sub = action.choices.get(command)
        if sub is not None:
            return list(sub._actions)  # noqa: SLF001
    return []


def _flag_name(field: str) -> str:
    """The ``train`` flag that sets TrainConfig ``field`` (``chunk_size`` -> ``--chunk-size``,
    ``use_labels`` -> ``--no-labels``), as the parser declares it."""
    dests = {dest for dest, mapped in _TRAIN_FLAGS.items() if mapped == field}
    for action in _subcommand_actions("train"):
        if action.dest in dests and action.option_strings:
            if isinstance(action, argparse._StoreFalseAction):  # noqa: SLF001 - the flag inverts the field
                # "--no-labels was False" would read backwards: name the field and how the flag sets it.
                return f"{field} (False with {action.option_strings[0]})"
            return action.option_strings[0]
    return f"TrainConfig.{field}"  # no flag sets it: keep the field's name


def _flags_in(text: str, flag_name=_flag_name) -> str:
    """``text`` with each ``TrainConfig.<field>`` replaced by ``flag_name(field)`` (by default
    ``train``'s flag)."""
    import re

    return re.sub(r"\bTrainConfig\.(\w+)", lambda m: flag_name(m.group(1)), text)


def _name_flags(exc: ValueError, flag_name=_flag_name) -> None:
    """:func:`_flags_in` on ``exc``'s message, in place (same exception, same traceback for
    ``ACE_LORA_DEBUG=1``)."""
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (_flags_in(exc.args[0], flag_name),)


# The flags that name a file or folder, per command (argparse dests).
_PATH_FLAGS = {"train": ("csv", "image_root", "out_dir", "pretrained", "init_checkpoint", "resume"),
               "zero-shot": ("csv", "image_root", "pretrained", "checkpoint", "output"),
               "demo": ("out_dir",)}


def _check_no_empty_paths(args: argparse.Namespace) -> None:
    """An empty path (an unset shell variable: ``--checkpoint "$CKPT"``) is refused: read as the flag
    left out, zero-shot would evaluate untrained adapters, train start afresh, and an empty folder is the
    working directory."""
    for dest in _PATH_FLAGS.get(args.command, ()):
        value = getattr(args, dest, None)
        if value == "":
            raise CLIError(f"--{dest.replace('_', '-')}: got an empty path {value!r}, expected a file or folder "
                           "name (or leave the flag out)")


def _check_device(spec: str) -> None:
    from ace_model.training import resolve_device

    resolve_device(spec, int(os.environ.get("LOCAL_RANK", "0")), name="--device")


def _check_train_inputs(args: argparse.Namespace) -> None:
    """Fail early, naming the problem, before a model is built."""
    from ace_model.data import read_csv
    from ace_model.training import _check_out_dir

    _check_device(args.device)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the other ranks write nothing there
        _check_out_dir(Path(args.out_dir), "--out-dir")
    read_csv(args.csv, ["image", "text"])
    for flag in ("pretrained", "init_checkpoint"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise CLIError(f"--{flag.replace('_', '-')}: {path!r} does not exist")
    if args.resume is not None and args.resume != "auto":
        # A missing state, or a folder without 'latest': said here, not after the model is built.
        from ace_model.training import resolve_resume

        try:
            resolve_resume(args.resume, args.out_dir)
        except (ValueError, FileNotFoundError) as exc:
            _name_flags(exc)
            raise


def cmd_train(args: argparse.Namespace) -> int:
    from ace_model import training

    config = train_config_from_args(args)
    try:
        config.validate()  # the flags first: they need no file
    except ValueError as exc:
        _name_flags(exc)
        raise
    _check_train_inputs(args)
    if not args.pretrained and args.model != "tiny" and int(os.environ.get("RANK", "0")) == 0:
        print(f"ace-lora train: warning: no --pretrained weights: the frozen {args.model} towers are random weights "
              f"(seeded with --seed {args.seed}); pass --pretrained with the model's weights for the paper's recipe",
              file=sys.stderr)
    latest = Path(args.out_dir) / "checkpoints" / "latest"
    # (With another run's ace_lora.pt there, train() refuses instead, saying why.)
    if (args.resume == "auto" and not latest.exists() and not (Path(args.out_dir) / "ace_lora.pt").exists()
            and int(os.environ.get("RANK", "0")) == 0):
        print(f"ace-lora train: note: no checkpoint in {str(latest.parent)!r} to resume: starting a fresh run",
              file=sys.stderr)
    global _TRAINED_IN_A_GROUP
    try:
        result = training.train(config)  # validates the configuration before any work
    except (ValueError, FileNotFoundError) as exc:
        _name_flags(exc)
        raise
    finally:
        _TRAINED_IN_A_GROUP = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Under torchrun every rank returns the same summary: print it once.
    if int(os.environ.get("RANK", "0")) == 0:
        print(_json(result))
    return 0


def _json(value) -> str:
    """Strict JSON: NaN and infinities (an undefined AUROC) become null."""
    import math

    def clean(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), indent=2, allow_nan=False)


# ----------------------------------------------------------------------------------------
# zero-shot
# ----------------------------------------------------------------------------------------


def _check_output_file(path: str, flag: str) -> None:
    """Fail before any work when ``path`` cannot be written as a file."""
    target = Path(path)
    if target.is_dir():
        raise CLIError(f"{flag}: {path!r} is a directory, expected a file name")
    folder = target.parent
    if not folder.is_dir():
        state = "is not a directory" if folder.exists() else "does not exist"
        raise CLIError(f"{flag}: {path!r}: its folder {str(folder)!r} {state}")
    from ace_model._atomic import create_temp_file

    try:  # the file is written through a temp file beside it: try one now
        fd, probe = create_temp_file(target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CLIError(f"{flag}: {path!r} cannot be written in its folder {str(folder)!r}: "
                       f"{exc.strerror or exc}") from None


def _class_names(args: argparse.Namespace) -> list[str]:
    from ace_model.data import read_csv

    header, _ = read_csv(args.csv, [args.image_column])
    if args.classes is not None:  # given, even empty (an unset shell variable): never the header's columns
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
    else:
        # A report column, when the evaluation CSV has one, is not a class.
        names = [c for c in header if c not in (args.image_column, "text")]
    if not names and args.classes is not None:
        raise CLIError(f"--classes: no class names in {args.classes!r}, expected comma-separated column names")
    if not names:
        raise CLIError(f"{args.csv}: no class columns (give --classes or add one 0/1 column per class)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CLIError(f"--classes: {', '.join(map(repr, repeated))} named more than once")
    if args.task in ("multiclass", "multilabel") and len(names) < 2:
        raise CLIError(f"--task {args.task} needs at least 2 classes, got {names}")
    if args.task == "binary" and len(names) != 2:
        raise CLIError(f"--task binary needs exactly 2 classes [negative, positive], got {names}")
    return names


def _warn_if_built_otherwise(metadata: dict, args: argparse.Namespace) -> None:
    """A checkpoint trained by ``ace-lora train`` records how its frozen towers were built:
    warn when this evaluation builds them otherwise (other towers, other results, no error)."""
    from ace_model.training import TRAINED_WITH

    trained = metadata.get(TRAINED_WITH)
    if not isinstance(trained, dict):
        return
    if trained.get("model") not in (None, args.model):
        print(f"ace-lora zero-shot: warning: --checkpoint was trained with --model {trained['model']!r}, this "
              f"evaluation builds --model {args.model!r}", file=sys.stderr)
    if trained.get("pretrained") and args.pretrained and not _same_path(trained["pretrained"], args.pretrained):
        print(f"ace-lora zero-shot: warning: --checkpoint was trained on the towers of --pretrained "
              f"{trained['pretrained']!r}; this evaluation builds them from {args.pretrained!r}", file=sys.stderr)
    elif not trained.get("pretrained") and args.pretrained:
        print(f"ace-lora zero-shot: warning: --checkpoint was trained on random frozen towers (no --pretrained); "
              f"this evaluation builds them from {args.pretrained!r}", file=sys.stderr)
    elif trained.get("pretrained") and not args.pretrained:
        print(f"ace-lora zero-shot: warning: --checkpoint was trained on the towers of --pretrained "
              f"{trained['pretrained']!r}; without --pretrained they are random weights here", file=sys.stderr)
    elif not trained.get("pretrained") and not args.pretrained and trained.get("seed") != args.seed:
        print(f"ace-lora zero-shot: warning: --checkpoint was trained on random frozen towers built with --seed "
              f"{trained.get('seed')}; --seed {args.seed} builds other ones (pass --seed {trained.get('seed')})",
              file=sys.stderr)


def _text_attention(metadata: dict, args: argparse.Namespace) -> str:
    """The text attention to evaluate with: --text-attention, else what the checkpoint was trained
    with (``ace-lora train`` records it), else "spec"; a flag that differs from the record warns."""
    from ace_model.training import recorded_text_attention

    recorded = recorded_text_attention(metadata)
    known = recorded if recorded in TEXT_ATTENTION else None
    if args.text_attention and recorded and args.text_attention != recorded:
        print(f"ace-lora zero-shot: warning: --checkpoint was trained with --text-attention {recorded!r}; this "
              f"evaluation uses {args.text_attention!r}", file=sys.stderr)
    if args.checkpoint and not args.text_attention and known is None:
        if recorded is not None:
            print(f"ace-lora zero-shot: warning: --checkpoint records --text-attention {recorded!r}, which this "
                  f"version does not know (expected one of {TEXT_ATTENTION}): evaluating with 'spec' (pass "
                  "--text-attention to choose)", file=sys.stderr)
        else:
            print("ace-lora zero-shot: warning: --checkpoint does not record its text attention: evaluating with "
                  "'spec' (the released ACE_LoRA.pt was trained by the published code: pass --text-attention "
                  "reference-code)", file=sys.stderr)
    return args.text_attention or known or "spec"


def _recorded_build(blob) -> tuple[str | None, int | None]:
    """(model, seed) that a checkpoint written by ``ace-lora train`` records (``blob``: the
    file's object), each None where it records none (or in another form: applying the file to
    the model names what is wrong); the seed only for random frozen towers (no pretrained
    weights), the only ones it builds."""
    from ace_model.training import TRAINED_WITH, recorded_model

    try:
        metadata = blob.get("metadata") if isinstance(blob, dict) else None
        record = metadata.get(TRAINED_WITH) if isinstance(metadata, dict) else None
        if not isinstance(record, dict):
            return None, None
        model, seed, pretrained = recorded_model(blob), record.get("seed"), record.get("pretrained")
        random_towers = pretrained is None or (isinstance(pretrained, str) and not pretrained)
        seed = seed if type(seed) is int and abs(seed) < 2**46 and random_towers else None
        return model, seed
    except Exception:
        return None, None


def _same_path(recorded: str, given: str) -> bool:
    """Whether a path recorded at training names the file given now (the same file, or the same
    absolute path when either is gone)."""
    try:
        return os.path.samefile(recorded, given)
    except OSError:
        return os.path.abspath(recorded) == os.path.abspath(given)


def _input_file(args: argparse.Namespace, flag: str) -> str | None:
    """The file zero-shot reads for ``flag``: for a ``--pretrained`` directory, the weights file in it."""
    given = getattr(args, flag)
    if flag == "pretrained" and given and os.path.isdir(given):
        from ace_model.model import resolve_pretrained

        try:
            return str(resolve_pretrained(given)[0])
        except FileNotFoundError:  # none in it: said when the model is built
            return None
    return given


def cmd_zero_shot(args: argparse.Namespace) -> int:
    from ace_model import ACELoRA
    from ace_model.checkpoint import CheckpointError, apply_reference_checkpoint, read_reference_checkpoint
    from ace_model.data import CSVImageLabelDataset, read_csv
    from ace_model.training import check_seed, resolve_device, seed_everything
    from ace_model.zero_shot import evaluate

    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.seed is not None:
        check_seed(args.seed, "--seed")
    device = resolve_device(args.device, name="--device")
    if args.output:
        _check_output_file(args.output, "--output")
        for flag in ("csv", "checkpoint", "pretrained"):  # the results would replace an input
            given = _input_file(args, flag)
            if given and os.path.exists(args.output) and os.path.exists(given) and os.path.samefile(args.output, given):
                raise CLIError(f"--output: {args.output!r} is the --{flag} file; the results would replace it")
    names = _class_names(args)
    scale = args.logit_scale
    if scale not in ("base", "learned"):
        try:
            scale = float(scale)
        except ValueError:
            scale = -1.0
        if not (math.isfinite(scale) and scale > 0):
            raise CLIError(f"--logit-scale: expected 'base', 'learned' or a positive number, got {args.logit_scale!r}")
    read_csv(args.csv, [args.image_column] + names)  # names missing label columns before the model is built
    for flag in ("pretrained", "checkpoint"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise CLIError(f"--{flag}: {path!r} does not exist")
    # The checkpoint is read once, before the model is built (an unreadable file stops here);
    # --model and --seed, where not given, are what it records (as --text-attention).
    try:
        blob = read_reference_checkpoint(args.checkpoint) if args.checkpoint else None
    except CheckpointError as exc:
        raise CLIError(f"--checkpoint: {exc}") from None
    recorded, recorded_seed = _recorded_build(blob)  # (None, None) without a checkpoint
    if recorded and args.model and args.model != recorded:
        # Said before the model is built (BiomedCLIP's towers take seconds), not by the load after it.
        raise CLIError(f"--checkpoint was trained with --model {recorded!r}, this evaluation builds --model "
                       f"{args.model!r}: {args.checkpoint} (its metadata records its model) fits only the LoRA layers "
                       f"and adapters of a {recorded!r} model; leave --model out to build that one")
    args.model = args.model or recorded or "biomedclip"
    if args.seed is None:
        args.seed = recorded_seed if recorded_seed is not None else DEFAULT_SEED
    if scale == "learned" and not args.checkpoint:
        print("ace-lora zero-shot: warning: --logit-scale learned without --checkpoint: no trained multiplier, so "
              "it is the base model's, as with 'base'", file=sys.stderr)
    if not args.pretrained:
        print(f"ace-lora zero-shot: warning: no --pretrained weights: the frozen towers are random weights "
              f"(seeded with --seed {args.seed}, as train builds them with the same seed)", file=sys.stderr)
    # As train does: seed, then build, so the same --seed gives the same frozen towers.
    seed_everything(args.seed)
    model = ACELoRA.from_config(args.model, pretrained=args.pretrained)
    try:
        # The loader itself, not the model's method: which attention the checkpoint was trained
        # with is decided and said by _text_attention below.
        metadata = apply_reference_checkpoint(model, args.checkpoint, blob) if args.checkpoint else {}
        del blob  # its tensors are copied into the model: no second copy through the evaluation
    except CheckpointError as exc:
        raise CLIError(f"--checkpoint: {exc}") from None
    if args.checkpoint:
        _warn_if_built_otherwise(metadata, args)
    model.text_attention = _text_attention(metadata, args)
    model.to(device)
    dataset = CSVImageLabelDataset(args.csv, names, model.image_size, image_column=args.image_column,
                                   image_root=args.image_root)
    result = evaluate(model, dataset, names, args.task, batch_size=args.batch_size, device=device,
                      logit_scale=scale, progress=args.progress)
    result["classes"] = names
    result["text_attention"] = model.text_attention
    undefined = [name for name, value in result.get("auroc_per_class", {}).items() if not math.isfinite(value)]
    if args.task == "binary" and not math.isfinite(result["auroc"]):
        print(f"ace-lora zero-shot: warning: AUROC undefined (null): the {result['n']} samples are all "
              f"{'positive' if int(dataset.labels[:, 1].sum()) == result['n'] else 'negative'} ({names[1]!r} "
              "is the positive class)", file=sys.stderr)
    if undefined:
        rest = (f"left out of the macro AUROC, which averages the other {len(names) - len(undefined)} classes"
                if len(undefined) < len(names) else "so the macro AUROC is undefined too (null)")
        print(f"ace-lora zero-shot: warning: AUROC undefined for {', '.join(undefined)} (no positive or no negative "
              f"sample): {rest}", file=sys.stderr)
    text = _json(result)
    print(text)
    if args.output:
        from ace_model._atomic import atomic_write_text

        atomic_write_text(args.output, text + "\n")
    return 0


# ----------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ace_model import ACELoRA
    from ace_model.data import SYNTHETIC_CLASSES, CSVImageLabelDataset, make_synthetic_dataset
    from ace_model.training import _check_out_dir, record_trained_with, seed_everything
    from ace_model.zero_shot import evaluate

    # Defaults (the --quick ones with --quick), never over a value given explicitly.
    for name, normal, quick in (("steps", 300, 150), ("train_size", 512, 256), ("test_size", 200, 100)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    # Checked before anything is written or evaluated, naming the flags.
    if args.steps < 1:
        raise CLIError(f"--steps: expected a positive number of training steps, got {args.steps}")
    if args.batch_size < 2:
        raise CLIError(f"--batch-size: expected at least 2 (a contrastive batch), got {args.batch_size}")
    if args.train_size < args.batch_size:
        raise CLIError(f"--train-size: expected at least --batch-size ({args.batch_size}) samples, got "
                       f"{args.train_size}")
    if args.test_size < 1:
        raise CLIError(f"--test-size: expected a positive number of samples, got {args.test_size}")
    if args.seed < 0:  # the synthetic data's generators take seeds >= 0
        raise CLIError(f"--seed: the demo expects an integer >= 0, got {args.seed}")
    out = Path(args.out_dir)
    _check_out_dir(out, "--out-dir")
    try:  # --seed's range too
        _demo_trainer(args, out / "train.csv", out)[1].validate()
    except ValueError as exc:  # "TrainConfig.lr: ..." -> "--lr: ..." (the demo's own flags)
        _name_flags(exc, _demo_flag_name)
        raise
    # The demo writes train.csv, test.csv, train/, test/, run/ and demo_summary.json: over an
    # earlier demo's files only, unless told (a user's own train.csv would be replaced).
    earlier_demo = (out / _DEMO_MARKER).exists() or (out / "demo_summary.json").exists()  # the latter: older demos
    if out.is_dir() and any(out.iterdir()) and not earlier_demo and not args.overwrite:
        raise CLIError(f"--out-dir: {str(out)!r} is not empty and holds no earlier demo, whose files (train.csv, "
                       f"test.csv, train/, test/, run/) the demo would replace; choose another directory or pass "
                       f"--overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / _DEMO_MARKER).write_text("written by ace-lora demo: a later demo may replace this folder's files\n")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    classes = list(SYNTHETIC_CLASSES)
    print(f"[demo] writing {args.train_size} training and {args.test_size} test samples under {out}/ "
          f"(classes: {', '.join(classes)})")
    train_csv = make_synthetic_dataset(out, args.train_size, image_size=32, seed=args.seed, name="train")
    test_csv = make_synthetic_dataset(out, args.test_size, image_size=32, seed=args.seed + 1000, name="test")

    train_fn, config = _demo_trainer(args, train_csv, out)
    # As train builds a model (seeded as zero-shot's --seed rebuilds it), with the record of how in
    # the weights it writes: zero-shot on the demo's checkpoint follows it.
    seed_everything(args.seed)
    model = record_trained_with(ACELoRA.from_config("tiny"), config)
    print(f"[demo] tiny ACE-LoRA model: {model.num_trainable_parameters():,} trainable parameters")
    test_set = CSVImageLabelDataset(test_csv, classes, model.image_size)
    before = evaluate(model, test_set, classes, "multiclass")
    print(f"[demo] zero-shot before training: accuracy {before['accuracy']:.3f}, AUROC {_auroc_text(before)} "
          f"(chance accuracy {1 / len(classes):.3f})")
    if not math.isfinite(before["auroc"]):
        print(f"ace-lora demo: warning: AUROC undefined (null in the summary): the {args.test_size} test samples "
              f"leave every class without a positive or a negative sample; a larger --test-size gives them both",
              file=sys.stderr)

    result = train_fn(config, model=model)
    losses = _read_losses(result)
    window = max(1, min(20, len(losses) // 4))
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    print(f"[demo] training loss: mean of the first {window} steps {first:.4f} -> last {window} steps {last:.4f}")

    after = evaluate(model, test_set, classes, "multiclass")
    print(f"[demo] zero-shot after training: accuracy {after['accuracy']:.3f}, AUROC {_auroc_text(after)} "
          f"(chance accuracy {1 / len(classes):.3f})")
    summary = {"loss_first": first, "loss_last": last, "steps": len(losses), "before": before, "after": after,
               "chance_accuracy": 1 / len(classes), "seconds": time.perf_counter() - started,
               "checkpoint": result.get("reference")}
    from ace_model._atomic import atomic_write_text

    atomic_write_text(out / "demo_summary.json", _json(summary) + "\n")
    print(f"[demo] done in {summary['seconds']:.0f} s; summary in {out / 'demo_summary.json'}, "
          f"checkpoint {summary['checkpoint']}")
    return 0


_DEMO_MARKER = ".ace-lora-demo"


def _auroc_text(result: dict) -> str:
    """The demo's macro AUROC, or "undefined" where no class has both a positive and a negative test sample."""
    return f"{result['auroc']:.3f}" if math.isfinite(result["auroc"]) else "undefined"


# The demo's flags for the TrainConfig fields it sets (its errors and warnings name them).
DEMO_FLAGS = {"lr": "--lr", "seed": "--seed", "batch_size": "--batch-size", "max_steps": "--steps"}


def _demo_flag_name(field: str) -> str:
    return DEMO_FLAGS.get(field, f"TrainConfig.{field}")


def _demo_trainer(args, train_csv: Path, out: Path):
    from ace_model.training import TrainConfig, train

    # The warm-up: one epoch (TrainConfig's default), or a tenth of a --steps too short for that.
    warmup = min(args.train_size // args.batch_size, args.steps // 10)
    config = TrainConfig(csv=str(train_csv), out_dir=str(out / "run"), model="tiny", epochs=10_000,
                         max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         warmup_steps=warmup, device="cpu", checkpoint_every=0, progress=args.progress,
                         overwrite=True)  # the demo's folder is its own: a second demo replaces the first
    return train, config


def _read_losses(result: dict) -> list[float]:
    from ace_model.training import read_metrics

    return [float(r["loss"]) for r in read_metrics(result["metrics"])]


# ----------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------


def _resume_hint(args: argparse.Namespace) -> str:
    """What ``--resume auto`` would continue from after an interrupted ``train``: what
    ``checkpoints/latest`` names now (this run's last checkpoint, or the one it started from)."""
    from ace_model.training import latest_record

    latest = Path(args.out_dir) / "checkpoints" / "latest"
    step = latest_record(latest).get("step")
    if step is None:
        return f"; no checkpoint in {str(latest.parent)!r}, so --resume auto would start afresh"
    return f"; --resume auto continues from step {step} ({str(latest)!r})"


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; for an error a DataLoader worker re-raised (its message is the
    worker's whole traceback), the last line: the original error, which names the row and file."""
    text = str(exc)
    if text.startswith("Caught ") and "DataLoader worker" in text.splitlines()[0]:
        lines = [line for line in text.splitlines() if line.strip()]
        last = lines[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        for name in (prefix, f"{type(exc).__qualname__}: "):
            if last.startswith(name):
                return last[len(name):]
        return last
    return text


# Modules the command line imports from the model extra (setup.py's extras_require["model"]),
# by import name: their distribution's name.
_MODEL_EXTRA = {"open_clip": "open_clip_torch", "timm": "timm", "transformers": "transformers", "tqdm": "tqdm",
                "PIL": "pillow"}


# Whether `train` ran in a torch.distributed group (torchrun, WORLD_SIZE > 1), which it has
# destroyed by the time it returns or raises.
_TRAINED_IN_A_GROUP = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ace-lora`` console script; returns the exit status.

    Run as the program (``argv`` None: the console script, ``python -m ace_model.cli``) under
    torchrun, ``train`` ends the process itself once its files are written and its process group
    destroyed: standard streams flushed, then ``os._exit(status)``, without interpreter
    finalization. gloo's worker threads can outlive ``destroy_process_group`` and abort the
    finalization ("terminate called without an active exception", SIGABRT), which turned the
    exit status of a complete run into -6 (torch 2.14.1, about one rank in 20 to 60; CI saw it).
    """
    status = _main(argv)
    if argv is None and _TRAINED_IN_A_GROUP:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _main(argv: Sequence[str] | None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    from ace_model.training import NonFiniteLossError, RankMismatchError

    handlers = {"train": cmd_train, "zero-shot": cmd_zero_shot, "demo": cmd_demo}
    debug = os.environ.get("ACE_LORA_DEBUG", "") not in ("", "0")

    show_warning = warnings.showwarning
    # The two packages are siblings (in the source tree and once installed); a virtual environment
    # inside the source tree is not ours.
    root = Path(__file__).resolve().parent.parent
    ours = tuple(str(root / package) + os.sep for package in ("ace_model", "ace_kernels"))

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        # Ours (ace_model, ace_kernels) as one line, like the errors; others as Python shows them.
        if str(Path(filename).resolve()).startswith(ours):
            text = message
            if args.command == "train":
                text = _flags_in(str(message))
            elif args.command == "demo":
                text = _flags_in(str(message), _demo_flag_name)
            print(f"ace-lora {args.command}: warning: {text}", file=sys.stderr)
        else:
            show_warning(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = one_line_warning
            _check_no_empty_paths(args)
            return handlers[args.command](args)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        # Our own checks (CLIError, DataError, CheckpointError, TrainingStateError and
        # the other ValueErrors naming an argument) and a missing file: the user's input.
        if debug:
            raise
        print(f"ace-lora {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as exc:
        # A package of the model extra (a plain `pip install ace-kernels` has only torch and numpy).
        package = (exc.name or "").split(".")[0]
        if debug or package not in _MODEL_EXTRA:
            raise
        print(f"ace-lora {args.command}: error: needs the {_MODEL_EXTRA[package]!r} package, which is not "
              "installed: pip install 'ace-kernels[model]'", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # Every state, metrics line and weights file is written atomically: what is on disk is the
        # last complete one, and `--resume auto` continues from it exactly.
        if debug:
            raise
        hint = _resume_hint(args) if args.command == "train" and int(os.environ.get("RANK", "0")) == 0 else ""
        print(f"ace-lora {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NonFiniteLossError, RankMismatchError, OSError) as exc:
        # Expected failures while running; after a non-finite loss the last good
        # checkpoint is kept on disk. Other exceptions (bugs, out of memory) propagate
        # with their traceback.
        if debug:
            raise
        # A failed write (a full disk) may leave a newer state file that no pointer names: say which
        # checkpoint --resume auto takes, as after an interruption.
        hint = (_resume_hint(args) if isinstance(exc, OSError) and args.command == "train"
                and int(os.environ.get("RANK", "0")) == 0 else "")
        print(f"ace-lora {args.command}: error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
