"""The README's Python examples run as written: the API one with the tensors it names made up
front, the training one as it stands (it makes its own data), each in a fresh process; and its
`ace-lora` command lines parse."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the API example takes as given, at the shapes its comments name (ACE-HGNN: dim 512).
API_INPUTS = """\
import torch
torch.manual_seed(0)
x = torch.randn(2, 5, 16)
w_qkv, b_qkv = torch.randn(3 * 8, 16), torch.randn(3 * 8)
lora_a, lora_b = torch.randn(3, 4, 16), torch.randn(3, 8, 4)
tokens, cls_attn = torch.randn(2, 9, 512), torch.rand(2, 8)
image_emb = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
text_emb = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
labels = torch.tensor([[1, 0], [0, 1], [1, 0], [1, 1], [0, 1], [0, 0]])
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
trained = []
def train(model):
    trained.append(model)
"""

API_CHECKS = """
assert q.shape == k.shape == v.shape == (2, 5, 8) and qkv.shape == (2, 5, 24)
assert cls.shape == (2, 512) and loss.ndim == 0 and torch.isfinite(loss)
assert trained == [model]
print("api example ran")
"""

TRAINING_CHECKS = """
assert len(losses) == 20 and all(loss == loss for loss in losses), losses
assert isinstance(metrics, dict) and metrics, metrics
print("training example ran")
"""


def _python_blocks() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```$", text, re.S | re.M)


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _block(needle: str) -> str:
    found = [block for block in _python_blocks() if needle in block]
    assert len(found) == 1, f"one README Python example with {needle!r}, found {len(found)}"
    return found[0]


def test_the_readme_has_the_examples_these_tests_run():
    assert len(_python_blocks()) == 2


def test_the_api_example_runs(tmp_path):
    proc = _run(API_INPUTS + _block("ace_kernels.lora_qkv(") + API_CHECKS, tmp_path)
    assert proc.returncode == 0 and "api example ran" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_the_training_example_runs(tmp_path):
    proc = _run(_block("TrainConfig(") + TRAINING_CHECKS, tmp_path)
    assert proc.returncode == 0 and "training example ran" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run1" / "metrics.jsonl").is_file()


def _command_lines() -> list[list[str]]:
    """The README's `ace-lora` command lines (bash blocks; continuation lines joined, comments and
    a `...` dropped), as the argument lists the command line parses; `torchrun ... -m
    ace_model.cli` lines from the module's name on."""
    import shlex

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```$", text, re.S | re.M):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if "ace-lora" in words:
                commands.append(words[words.index("ace-lora") + 1:])
            elif "ace_model.cli" in words:
                commands.append(words[words.index("ace_model.cli") + 1:])
    return [[word for word in words if word != "..."] for words in commands]


def test_the_readme_command_lines_parse_with_whole_flag_names():
    """Each parses, and names each flag in full (argparse would also take `--loss-scop`)."""
    import argparse

    from ace_model import cli

    parser = cli._parser()
    (commands_action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {name: set(sub._option_string_actions) for name, sub in commands_action.choices.items()}
    commands = _command_lines()
    assert len(commands) == 9 and {words[0] for words in commands} == {"demo", "train", "zero-shot"}, commands
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit as exc:  # argparse's usage error
            pytest.fail(f"the README's `ace-lora {' '.join(words)}` does not parse (exit {exc.code})")
        partial = [w for w in words if w.startswith("--") and w.split("=", 1)[0] not in flags[words[0]]]
        assert not partial, f"the README's `ace-lora {' '.join(words)}` abbreviates {partial}"
