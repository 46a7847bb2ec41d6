"""A failed start's clean-up (commands.run_folder.remove_failed_start) in a folder that was there before the run:
what it removes and what it must leave."""

from pathlib import Path
from types import SimpleNamespace

from drifting_lightning.commands.run_folder import remove_failed_start, run_folder_entries


def test_a_failed_start_removes_only_the_run_files_and_empty_folders_it_added(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("earlier run")
    deep = tmp_path / "project" / "src" / "pkg"
    deep.mkdir(parents=True)
    (deep / "module.py").write_text("")
    existing = run_folder_entries(tmp_path)
    assert tmp_path / "project" / "src" in existing and deep not in existing  # two levels, no deeper

    # what the start added: its own files, a new empty folder; and what others wrote meanwhile
    added_run_files = [tmp_path / "config.resume-1.yaml", tmp_path / "hparams.yaml",
                       tmp_path / "events.out.tfevents.1.host.1.0"]  # fmt: skip
    for path in added_run_files:
        path.write_text("")
    (tmp_path / "checkpoints").mkdir()
    others = [tmp_path / "notes.txt", tmp_path / "project" / "new.py", deep / "late.py", tmp_path / "a.ckpt"]
    for path in others:
        path.write_text("")

    remove_failed_start(SimpleNamespace(global_step=0), tmp_path, existing)
    assert not any(p.exists() for p in added_run_files) and not (tmp_path / "checkpoints").exists()
    assert all(p.exists() for p in others) and (tmp_path / "config.yaml").read_text() == "earlier run"
    assert (deep / "module.py").exists()

    # a run that took a step keeps everything
    (tmp_path / "hparams.yaml").write_text("")
    remove_failed_start(SimpleNamespace(global_step=1), tmp_path, existing)
    assert (tmp_path / "hparams.yaml").exists()
