"""The checkpoint manifest: every file of a checkpoint is covered by a SHA-256 written last; resume, export, eval and
generate verify it, and any damage (a file changed, cut, deleted or added, the manifest edited or deleted) is one
line naming the checkpoint, exit 2, never a traceback and never a silent load.

Case count (hypothesis max_examples): damaged checkpoints through the CLI 30.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config, run_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from superpose.errors import SuperposeError
from superpose.export import export, is_export, load_model, load_run
from superpose.models import build_model
from superpose.train import checkpoint as checkpoint_module
from superpose.train.checkpoint import (
    MANIFEST,
    checkpoint_files,
    list_checkpoints,
    resume_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from superpose.train.loop import train
from superpose.train.metrics import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.save, one process

NEWEST = "checkpoints/step-0000004"
LAYOUTS = ("single", "dcp")


def run_config(data, out_dir, name):
    """4 steps, checkpoints at steps 2 and 4 (bag 4 for steps 1-2, then bag 1)."""
    return make_tiny_config(data, out_dir, name, train={"steps": 4}, checkpoint={"every": 2, "keep": 5})


@pytest.fixture(scope="module")
def pristine(embedded_data, tmp_path_factory):
    """layout -> a finished run: ``single`` holds model.safetensors and optimizer.pt, ``dcp`` the distributed layout
    (here written by one process, as FSDP2 on one GPU writes it)."""
    root = tmp_path_factory.mktemp("pristine")
    runs = {"single": train(run_config(embedded_data, root, "single"), progress=False).run_dir}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_module, "is_sharded", lambda model: True)
        runs["dcp"] = train(run_config(embedded_data, root, "dcp"), progress=False).run_dir
    assert (runs["dcp"] / NEWEST / "dcp" / ".metadata").is_file()
    return runs


def copy_run(pristine, embedded_data, layout, to):
    """A writable copy of a pristine run: its config, that config as a TOML file (for the CLI), the checkpoint."""
    shutil.copytree(pristine[layout], to / "runs" / layout)
    cfg = run_config(embedded_data, to / "runs", layout)
    path = to / f"{layout}.toml"
    path.write_text(cfg.to_toml())
    return cfg, path, cfg.run_dir / NEWEST


def files_of(pristine, layout):
    """Every file of the layout's newest checkpoint, its manifest included."""
    return checkpoint_files(pristine[layout] / NEWEST) + [MANIFEST]


def damage(path, kind, where=0.5):
    """``flip`` one bit at fraction ``where`` of the file, ``cut`` it to that fraction, ``delete`` it, ``append``
    a byte; ``add`` a file beside it."""
    if kind == "delete":
        path.unlink()
    elif kind == "add":
        (path.parent / "extra.bin").write_bytes(b"\0")
    elif kind == "append":
        path.write_bytes(path.read_bytes() + b"\n")
    else:
        blob = bytearray(path.read_bytes())
        at = min(int(where * len(blob)), len(blob) - 1)
        if kind == "flip":
            blob[at] ^= 0x01
        else:
            del blob[at:]
        path.write_bytes(bytes(blob))


def refused(call, ckpt):
    """``call()`` raises a one-line SuperposeError that names the checkpoint; its message."""
    with pytest.raises(SuperposeError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and str(ckpt) in message, message
    return message


def resume_in_process(cfg, ckpt):
    model = build_model("tiny", 512, seed=0)
    return resume_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), cfg.to_dict())


def test_every_file_of_both_layouts_is_in_the_manifest(pristine):
    for layout, run in pristine.items():
        ckpt = run / NEWEST
        listed = [line.split("  ", 1)[1] for line in (ckpt / MANIFEST).read_text().splitlines()[1:]]
        on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
        assert sorted(listed + [MANIFEST]) == on_disk
        assert {"state.json", "config.json", "config.toml"} <= set(listed)
        assert ({"model.safetensors", "optimizer.pt"} if layout == "single" else {"dcp/.metadata"}) <= set(listed)
        assert "sha256" not in json.loads((ckpt / "state.json").read_text())  # one record of checksums: the manifest
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["flip", "delete"])
def test_any_one_file_damaged_is_refused_by_resume_and_export(pristine, embedded_data, tmp_path, layout, kind):
    """Each file of each layout in turn, the manifest included: resume and export (which generate and eval share)
    refuse in one line naming the checkpoint."""
    for i, name in enumerate(files_of(pristine, layout)):
        cfg, _, ckpt = copy_run(pristine, embedded_data, layout, tmp_path / str(i))
        damage(ckpt / name, kind)
        refused(lambda: resume_in_process(cfg, ckpt), ckpt)
        refused(lambda: load_run(cfg.run_dir), ckpt)
        refused(lambda: load_model(ckpt), ckpt)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=st.sampled_from(LAYOUTS), pick=st.integers(0, 99),
       kind=st.sampled_from(["flip", "cut", "delete", "append", "add"]), where=st.floats(0, 1))
def test_random_damage_is_one_line_exit_2_for_resume_and_export(pristine, embedded_data, tmp_path_factory, capsys,
                                                                 layout, pick, kind, where):
    names = files_of(pristine, layout)
    name = names[pick % len(names)]
    cfg, path, ckpt = copy_run(pristine, embedded_data, layout, tmp_path_factory.mktemp("damaged"))
    damage(ckpt / name, kind, where)
    before = {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()}
    assert "step-0000004" in run_error(capsys, ["train", str(path), "--resume", "--quiet"])
    assert {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()} == before  # nothing was rewritten
    out = path.parent / "export"
    assert "step-0000004" in run_error(capsys, ["export", str(cfg.run_dir), "--out", str(out)])
    assert not out.exists()


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


STATE_EDITS = {
    "step": lambda s: s.update(step=3),
    "text_tokens": lambda s: s.update(text_tokens=s["text_tokens"] + 1),
    "loader.levels": lambda s: s["loader"].update(levels=[v + 1 for v in s["loader"]["levels"]]),
}


@pytest.mark.parametrize("field", STATE_EDITS)
def test_an_edited_state_json_is_refused_not_resumed(pristine, embedded_data, tmp_path, field):
    """Issue 19 item 2: a one-value edit of state.json resumed with exit 0 and other losses or counts."""
    cfg, _, ckpt = copy_run(pristine, embedded_data, "single", tmp_path)
    _edit_json(ckpt / "state.json", STATE_EDITS[field])
    assert "state.json is damaged" in refused(lambda: train(cfg, resume=True, progress=False), ckpt)


def test_a_deleted_manifest_does_not_turn_verification_off(pristine, embedded_data, tmp_path):
    """Issue 19 item 2: deleting the checksum record let a flipped weight bit load. The newest checkpoint is named,
    not skipped for an older one."""
    cfg, _, ckpt = copy_run(pristine, embedded_data, "single", tmp_path)
    damage(ckpt / "model.safetensors", "flip", 0.99)
    (ckpt / MANIFEST).unlink()
    assert list_checkpoints(cfg.run_dir)[-1] == ckpt
    assert f"has no {MANIFEST}" in refused(lambda: train(cfg, resume=True, progress=False), ckpt)


def test_a_checkpoint_of_the_format_before_manifests_is_refused(pristine, embedded_data, tmp_path):
    """The previous format recorded the weights' checksums in state.json: refused in one line (accepting it would
    let a deleted manifest turn verification of state.json and the configs off again)."""
    cfg, _, ckpt = copy_run(pristine, embedded_data, "single", tmp_path)
    sums = {n: line.split("  ")[0] for line in (ckpt / MANIFEST).read_text().splitlines()[1:]
            for n in [line.split("  ", 1)[1]] if n in ("model.safetensors", "optimizer.pt")}
    _edit_json(ckpt / "state.json", lambda s: s.update(sha256=sums))
    (ckpt / MANIFEST).unlink()
    message = refused(lambda: train(cfg, resume=True, progress=False), ckpt)
    assert "versions without one are refused" in message


def test_an_edited_config_json_is_not_exported(pristine, embedded_data, tmp_path, capsys):
    """Issue 19 item 2: rms_norm_eps 1e-6 -> 0.5 in the checkpoint's config.json was exported with the trained
    weights, silently a different model. Generate and eval load it the same way."""
    cfg, _, ckpt = copy_run(pristine, embedded_data, "single", tmp_path)
    _edit_json(ckpt / "config.json", lambda c: c.update(rms_norm_eps=0.5))
    out = tmp_path / "export"
    assert "config.json is damaged" in run_error(capsys, ["export", str(cfg.run_dir), "--out", str(out)])
    assert not out.exists()
    refused(lambda: load_model(ckpt), ckpt)


def test_a_checkpoint_without_state_json_is_not_loaded_as_an_export(pristine, embedded_data, tmp_path):
    """A checkpoint holds config.json and model.safetensors like an export; without state.json (and even without
    its manifest) it is still a checkpoint, refused, not loaded unverified by transformers."""
    _, _, ckpt = copy_run(pristine, embedded_data, "single", tmp_path)
    (ckpt / "state.json").unlink()
    assert not is_export(ckpt)
    assert "is missing state.json" in refused(lambda: load_model(ckpt), ckpt)
    (ckpt / MANIFEST).unlink()
    assert not is_export(ckpt)
    refused(lambda: load_model(ckpt), ckpt)


def test_the_manifest_is_written_last_and_a_kill_before_it_resumes_from_the_previous_checkpoint(
        pristine, embedded_data, tmp_path, monkeypatch):
    """Killed after every other file of step 4 is written (the kill point ``manifest``): step 4 is not a checkpoint;
    --resume continues from step 2 with the uninterrupted losses."""

    class Killed(BaseException):
        pass

    def kill_at(point, step):
        if (point, step) == ("manifest", 4):
            raise Killed

    cfg = run_config(embedded_data, tmp_path, "single")
    monkeypatch.setattr(checkpoint_module, "kill_point", kill_at)
    with pytest.raises(Killed):
        train(cfg, progress=False)
    half = cfg.run_dir / "checkpoints" / ".tmp-step-0000004"
    assert not (half / MANIFEST).exists() and {"state.json", "config.json", "model.safetensors"} <= {
        p.name for p in half.iterdir()}
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-0000002"]
    monkeypatch.undo()
    train(cfg, resume=True, progress=False)
    assert read_metrics(cfg.run_dir / "metrics.jsonl") and [
        (r["step"], r["train_loss"]) for r in read_metrics(cfg.run_dir / "metrics.jsonl")] == [
        (r["step"], r["train_loss"]) for r in read_metrics(pristine["single"] / "metrics.jsonl")]
    assert not half.exists()
    verify_checkpoint(cfg.run_dir / NEWEST)


def test_a_resealed_checkpoint_loads(pristine, embedded_data, tmp_path):
    """write_manifest records what is there: a checkpoint rewritten on purpose (a tool, a test of the content
    checks) is consistent again. The manifest detects damage, not a forger who rewrites it too."""
    cfg, _, ckpt = copy_run(pristine, embedded_data, "single", tmp_path)
    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(SuperposeError, match="notes.txt is not in its manifest"):
        verify_checkpoint(ckpt)
    write_manifest(ckpt)
    verify_checkpoint(ckpt)
    assert export(cfg.run_dir, tmp_path / "hf").is_dir()
    assert Path(tmp_path / "hf" / "model.safetensors").is_file()
