"""ZeRO 1, 2 and 3 each train on a real corpus (2 gloo ranks), the loss falls,
and the logged LR is the WSD formula at every step for each decay shape."""
import pytest
import train_harness as h

from doge.training.schedule import WSD

pytestmark = pytest.mark.slow


def check_run(rundir, shape):
    lines = h.train_lines(rundir)
    assert sorted(lines) == list(range(1, 25)), "one metrics line per step"
    first, last = [lines[s]["loss"] for s in (1, 2, 3)], [lines[s]["loss"] for s in (22, 23, 24)]
    assert sum(last) / 3 < sum(first) / 3 - 1.5, f"loss did not fall: {first} -> {last}"
    wsd = WSD(3e-3, warmup_steps=4, decay_steps=8, max_steps=24, decay_shape=shape)
    for step, line in lines.items():
        assert line["lr"] == wsd(step - 1), f"step {step}: lr {line['lr']} != WSD {wsd(step - 1)}"
        assert line["samples_consumed"] == step * h.GLOBAL_SAMPLES
    val = [r["val_loss"] for r in h.metrics(rundir) if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    assert (rundir / "final" / "model.safetensors").is_file() and (rundir / "loss.png").is_file()


def test_zero2_linear_decay():
    check_run(h.reference_run(), "linear")


@pytest.mark.parametrize("zero, shape", [("zero1", "cosine"), ("zero3", "1-sqrt")])
def test_zero_stage_trains(zero, shape):
    rundir = h.BASE / f"{zero}-{shape}"
    h.run(h.train_cmd(2, rundir, h.prepared(), "--decay-shape", shape, zero=zero))
    check_run(rundir, shape)
