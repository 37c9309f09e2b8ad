"""`python -m doge.average`: the mean of a run's checkpoints as an export stock transformers loads,
equal to the mean of the checkpoints' own exports; checkpoints of another model are refused."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import train_harness as h
import transformers
from safetensors.torch import load_file

from doge import average
from doge.training import checkpoint as ckpt

pytestmark = pytest.mark.slow


def steps(rundir):
    return ckpt.complete_checkpoints(rundir / "checkpoints")


def test_average_of_the_last_two_equals_the_mean_of_their_exports(tmp_path):
    rundir = h.reference_run()
    last_two = steps(rundir)[-2:]
    exports = []
    for i, folder in enumerate(last_two):
        exports.append(tmp_path / f"export-{i}")
        h.run([sys.executable, "-m", "doge.export", str(folder), str(exports[-1])])
    out = tmp_path / "average"
    done = h.run([sys.executable, "-m", "doge.average", str(rundir), "--last", "2", "--output", str(out)])
    assert f"wrote {out}" in done.stdout
    a, b, mean = (load_file(folder / "model.safetensors") for folder in (*exports, out))
    assert set(mean) == set(a)
    moved = 0
    for name, tensor in mean.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=0, atol=1e-7, msg=name)
        moved += not torch.equal(a[name], b[name])
    assert moved > 0  # the two checkpoints differ: the mean is not one of them
    stock = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(stock(ids).logits).all()
    assert (out / "tokenizer.json").is_file()


def other_model_checkpoint(tmp_path):
    """A copy of a reference checkpoint whose trainer state records another model config."""
    copy = tmp_path / "other" / "checkpoints" / "step-00000016"
    shutil.copytree(steps(h.reference_run())[-2], copy)
    state_path = copy / ckpt.STATE_FILE
    state = json.loads(state_path.read_text())
    state["model_config"]["num_hidden_layers"] += 1
    state_path.write_text(json.dumps(state))
    (copy / ckpt.MANIFEST_FILE).unlink()
    ckpt.write_manifest(copy)
    return copy


@pytest.mark.parametrize("case, message", [
    ("other-model", "holds another model than"),
    ("too-few", "--last 9: "),
    ("one-checkpoint", "give two or more checkpoint folders"),
    ("output-exists", "exists and is not empty"),
    ("not-a-checkpoint", "not a complete checkpoint"),
])
def test_what_cannot_be_averaged_is_refused_in_one_line(tmp_path, capsys, case, message):
    rundir = h.reference_run()
    last = steps(rundir)[-1]
    out = tmp_path / "out"
    args = {
        "other-model": lambda: [str(last), str(other_model_checkpoint(tmp_path)), "--output", str(out)],
        "too-few": lambda: [str(rundir), "--last", "9", "--output", str(out)],
        "one-checkpoint": lambda: [str(last), "--output", str(out)],
        "output-exists": lambda: [str(rundir), "--last", "2", "--output", str(rundir / "checkpoints")],
        "not-a-checkpoint": lambda: [str(last), str(tmp_path), "--output", str(out)],
    }[case]()
    before = h.tree_digest(rundir)
    assert average.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and h.tree_digest(rundir) == before


def test_the_command_answers_help_without_loading_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "doge.average", "--help"],
                          capture_output=True, text=True, cwd=h.REPO, env=h.env())
    assert done.returncode == 0 and "--last" in done.stdout
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()}
