"""Continue from a stable-phase checkpoint with a new schedule on new data, into a
new RUNDIR; the source run stays byte-for-byte unchanged."""
import pytest
import train_harness as h

from doge.training.checkpoint import TrainerState, find_latest
from doge.training.schedule import WSD

pytestmark = pytest.mark.slow


def test_continue_from_stable_checkpoint_on_new_data():
    reference = h.reference_run()
    source = reference / "checkpoints" / "step-00000016"  # decay starts after step 16: stable phase
    before = h.tree_digest(reference)
    rundir = h.BASE / "continued"
    new_data = h.prepared("hh_helpful_dialogues.txt")
    done = h.run(h.train_cmd(2, rundir, new_data, "--init-from", str(source), "--max-steps", "8",
                             "--warmup-steps", "2", "--decay-steps", "4", "--decay-shape", "cosine", "--lr", "1e-3",
                             "--eval-interval", "0"))
    assert h.tree_digest(reference) == before, "the source run was modified"
    assert f"initialised from {source} at step 0" in done.stdout
    lines = h.train_lines(rundir)
    wsd = WSD(1e-3, warmup_steps=2, decay_steps=4, max_steps=8, decay_shape="cosine")
    assert sorted(lines) == list(range(1, 9)) and all(lines[s]["lr"] == wsd(s - 1) for s in lines)
    assert lines[1]["samples_consumed"] == h.GLOBAL_SAMPLES, "the new data is read from its start"
    fresh_loss = h.train_lines(reference)[1]["loss"]
    assert lines[1]["loss"] < fresh_loss - 1.0, "weights came from the source checkpoint"
    state = TrainerState.read(find_latest(rundir / "checkpoints"))
    assert state.step == 8 and state.data_fingerprint != TrainerState.read(source).data_fingerprint
    assert (rundir / "final" / "model.safetensors").is_file()
