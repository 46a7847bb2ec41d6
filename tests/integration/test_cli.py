"""The `drifting` command: list, short component names, clear errors, a toy fit that writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.integration.cli_helpers import REPO, run_drifting, run_drifting_subprocess

TOY = str(REPO / "configs" / "toy" / "checkerboard.yaml")
FAST = ["--trainer.max_steps", "4", "--model.init_args.generated_per_group", "64",
        "--data.init_args.positives_per_step", "64"]


def test_list_prints_every_kind_with_docs_and_args():
    out = run_drifting_subprocess("list")  # the real entry point, once
    assert out.returncode == 0, out.stderr
    for name in ("kernels:", "Laplace", "Gaussian", "Cauchy", "fields:", "MeanShift", "MMD", "SinkhornDrift",
                 "generators:", "MLPGenerator", "DiT", "encoders:", "Identity", "data:", "ToyDataModule"):
        assert name in out.stdout, name
    assert "args: normalization='both'" in out.stdout


def test_list_takes_a_kind_in_the_singular():
    assert run_drifting("list", "kernel").stdout == run_drifting("list", "kernels").stdout != ""


def test_a_closed_pipe_ends_a_command_quietly(capsys):
    from drifting_lightning.commands import guarded

    def reader_left() -> int:  # what print raises under `drifting list | head` once head has exited
        raise BrokenPipeError(32, "Broken pipe")

    assert guarded(reader_left) == 141
    assert capsys.readouterr().err == ""


def test_list_unknown_kind_suggests():
    out = run_drifting("list", "kernals")
    assert out.returncode == 2
    assert "did you mean 'kernels'" in out.stderr


def test_unknown_component_name_gets_did_you_mean():
    out = run_drifting("fit", "--config", TOY, "--model.init_args.loss.init_args.kernel", "Gausian", *FAST)
    assert out.returncode != 0
    assert "did you mean 'Gaussian'" in out.stderr


def test_missing_config_file_is_named():
    out = run_drifting("fit", "--config", "configs/does_not_exist.yaml")
    assert out.returncode != 0
    assert "does_not_exist.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_malformed_config_is_reported(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    out = run_drifting("fit", "--config", str(bad))
    assert out.returncode != 0
    assert "bad.yaml" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("content", "expected"), [
    ("# my overrides, none yet\n", "is empty (or holds only comments)"),
    ("- model\n- data\n", "holds a list, not keys"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not a text file"),
    (None, "is a folder"),
])
def test_a_config_file_that_holds_no_config_is_named(tmp_path: Path, content, expected):
    path = tmp_path / "override.yaml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    out = run_drifting("fit", "--config", TOY, "--config", str(path))
    assert out.returncode != 0
    assert f"config file {path} {expected}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("content", "expected"), [
    ("modle:\n  init_args: {}\n", "config file {path}: unknown section 'modle'; did you mean 'model'? A fit config "
                                 "holds seed_everything, trainer, model, data,"),
    ("trainer:\n  max_step: 10\n", "trainer.max_step: no such option; did you mean 'trainer.max_steps'"),
    ("trainer:\n  callbacks:\n    - class_path: ScatterPlotCalback\n",
     "trainer.callbacks: unknown Callback 'ScatterPlotCalback'; did you mean 'ScatterPlotCallback'? Choose from"),
])  # fmt: skip
def test_a_mistyped_key_or_class_in_a_config_file_is_named_with_a_suggestion(tmp_path: Path, content, expected):
    path = tmp_path / "override.yaml"
    path.write_text(content)
    line = error_of(run_drifting("fit", "--config", TOY, "--config", str(path)))
    assert line.startswith("error: " + expected.format(path=path)), line


def test_swap_kernel_and_field_by_short_name_and_fit_writes_outputs(tmp_path: Path):
    out = run_drifting(
        "fit", "--config", TOY, *FAST,
        "--model.loss.kernel", "Gaussian", "--model.loss.field", "SinkhornDrift",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = next((tmp_path / "checkerboard").glob("version_*"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    loss = config["model"]["init_args"]["loss"]["init_args"]
    assert loss["kernel"]["class_path"].endswith("Gaussian")
    assert loss["field"]["class_path"].endswith("SinkhornDrift")
    assert (run / "samples_final.png").stat().st_size > 1000
    assert list(run.glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics  # the energy distance callback wrote its value
    assert list((run / "checkpoints").glob("*.ckpt"))


def test_print_config_round_trips(tmp_path: Path):
    first = run_drifting("fit", "--config", TOY, "--model.loss.kernel", "Cauchy", "--print_config")
    assert first.returncode == 0, first.stderr
    saved = tmp_path / "printed.yaml"
    saved.write_text(first.stdout)
    second = run_drifting("fit", "--config", str(saved), "--print_config")
    assert second.returncode == 0, second.stderr
    assert yaml.safe_load(first.stdout) == yaml.safe_load(second.stdout)
    assert "Cauchy" in first.stdout


@pytest.mark.parametrize("override", [["--model.loss.max_chunk_elements", "null"],
                                      ["--model.loss.init_args.max_chunk_elements=null"],
                                      ["--model.loss.max_chunk_elements", "None"]])
def test_null_on_the_command_line_reaches_a_component_inside_the_model(tmp_path: Path, override: list[str]):
    # jsonargparse passes such overrides on as text after parsing them, and null came out as the string "None"
    bounded = tmp_path / "bounded.yaml"
    bounded.write_text("model:\n  init_args:\n    loss:\n      init_args:\n        max_chunk_elements: 4096\n")
    printed = run_drifting("fit", "--config", TOY, "--config", str(bounded), *override, "--print_config")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["model"]["init_args"]["loss"]["init_args"]["max_chunk_elements"] is None


@pytest.mark.parametrize(("override", "expected"), [
    (["--model.lr", "null"], "model.lr: expected a number, got null"),
    (["--model.generator.noise_dim", "null"], "model.generator.noise_dim: expected an integer, got null"),
    (["--model.loss.temperatures", "None"], "model.loss.temperatures: expected a list, got null"),
    (["--model.loss.field", "MeanShift", "--model.loss.field.normalization", "null"],
     "model.loss.field.normalization: expected one of 'both', 'targets', 'none', got null"),
])
def test_null_for_an_argument_that_needs_a_value_is_one_short_error(override: list[str], expected: str):
    # jsonargparse lets these nulls through to the constructors, which failed with bare TypeErrors
    result = run_drifting("fit", "--config", TOY, *override, *FAST)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr


def test_null_reaches_an_optional_path_inside_the_model():
    mae = str(REPO / "configs" / "fashion_mnist_mae.yaml")
    printed = run_drifting("fit", "--config", mae, "--model.encoder.checkpoint", "null", "--print_config")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["model"]["init_args"]["encoder"]["init_args"]["checkpoint"] is None
    # ... and inside a list of components given whole (it arrived as the string 'None')
    pixel = str(REPO / "configs" / "imagenet_pixel_B.yaml")
    listed = run_drifting("fit", "--config", pixel, "--trainer.accelerator", "cpu", "--model.encoder.encoders",
                          "[{class_path: ResNetMAE, init_args: {checkpoint: null}}]", "--print_config")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    encoders = yaml.safe_load(listed.stdout)["model"]["init_args"]["encoder"]["init_args"]["encoders"]
    assert encoders[0]["init_args"]["checkpoint"] is None


def test_ctrl_c_in_a_tool_command_is_a_short_message(capsys, monkeypatch):
    from drifting_lightning import cli
    from drifting_lightning.commands import sample

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "main", interrupted)
    assert cli.main(["sample", "--ckpt", "x.ckpt", "--out", "x.npz"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# ---- one short error that names the key, the value and the choices of the right kind ----------------------------
def error_of(out) -> str:
    """The `error: ...` line of a failed run, after checking that the message is at most 3 lines, no traceback."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0
    assert 1 <= len(lines) <= 3, out.stderr
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr
    return next(line for line in lines if line.startswith("error: "))


KERNELS = "Cauchy, Gaussian, InverseMultiquadric, Laplace"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.loss.kernel", "Foo"], f"error: model.loss.kernel: unknown kernel 'Foo'; choose from {KERNELS}"),
        (["--model.loss.kernel", "Gausian"],
         f"error: model.loss.kernel: unknown kernel 'Gausian'; did you mean 'Gaussian'? Choose from {KERNELS}"),
        (["--model.loss.field", "MeanShfit"],
         "error: model.loss.field: unknown field 'MeanShfit'; did you mean 'MeanShift'? Choose from MMD, MeanShift,"),
        (["--model.generator", "Foo"],
         "error: model.generator: unknown generator 'Foo'; choose from DiT, MLPGenerator"),
        (["--model.encoder", "Identiy"], "error: model.encoder: unknown encoder 'Identiy'; did you mean 'Identity'?"),
        (["--data", "ToyDataModul"], "error: data: unknown data module 'ToyDataModul'; did you mean 'ToyDataModule'"),
        (["--model.generated_per_grup", "3"],
         "error: model.generated_per_grup: DriftingModule has no argument 'generated_per_grup'; did you mean "
         "'generated_per_group'? Its arguments:"),
        (["--trainer.max_steps", "lots"], "error: trainer.max_steps: expected an integer, got 'lots'"),
        (["--seed_everything", "abc"], "error: seed_everything: expected true or false or an integer, got 'abc'"),
        (["--trainer.max_stepz", "3"], "error: unknown option --trainer.max_stepz; did you mean '--trainer.max_steps'"),
        (["--model.loss.temperatures", "[]"],
         "error: model.loss: temperatures must be a non-empty list of positive finite numbers, got []"),
        (["--trainer.callbacks.1.init_args.every_n_steps", "2"],
         "error: trainer.callbacks: list elements cannot be set by index on the command line "
         "(--trainer.callbacks.1.init_args.every_n_steps); set them in a config file (--config), or give the whole "
         "list: --trainer.callbacks '[...]'"),
        (["--model.lr", "-1"], "error: model: lr must be > 0, got -1.0"),
        (["--model.encoder", "ResNetMAE", "--model.encoder.checkpoint", "no/mae.ckpt"],
         "error: model.encoder: encoder checkpoint not found: 'no/mae.ckpt' (check the path; nothing is downloaded). "
         "Pretrain one (`drifting fit --config configs/mae/<data>.yaml`"),
        (["--model.betas", "[0.9, 1.5]"], "error: model: betas must be two numbers in [0, 1), got [0.9, 1.5]"),
        (["--model.loss.temperatures", "[-0.05]"],
         "error: model.loss: temperatures must be a non-empty list of positive finite numbers, got [-0.05]"),
        (["--model.guidance", "ClassAwareSampler"],
         "error: model.guidance: ClassAwareSampler does not go here: this takes a GuidanceSampler"),
        (["--model.loss.temperatures", "0.05"],
         "error: model.loss.temperatures: expected a list, got '0.05'; in brackets, e.g. --model.loss.temperatures "
         "'[0.05]'"),
        (["--model.loss.field", "MeanShift", "--model.loss.field.normalization", "bogus"],
         "error: model.loss.field.normalization: expected one of 'both', 'targets', 'none', got 'bogus'"),
        (["--model.loss.field", "MMD", "--model.loss.field.normalization", "both"],
         "error: model.loss.field.normalization: MMD takes no arguments"),
        (["--data", "ImageDataModule"],
         "error: data: ImageDataModule is a base class; choose one of the data modules: DigitsDataModule, "
         "IDXDataModule,"),
        (["--trainer.devices", "two"],
         "error: trainer.devices two: `devices` selected with `CPUAccelerator` should be an int > 0."),
        (["--model.loss.temperatures", "[0.05,"],
         "error: model.loss.temperatures: '[0.05,' is not a complete list; e.g. --model.loss.temperatures '[0.05]'"),
        (["--model.loss.feild.normalization", "both"],
         "error: model.loss.feild: DriftingLoss has no argument 'feild'; did you mean 'field'? Its arguments:"),
        (["--model.loss.kernel", "Kernel"],
         "error: model.loss.kernel: Kernel is a base class; choose one of the kernels: Cauchy, Gaussian,"),
        (["--model.generator", "Generator"],
         "error: model.generator: Generator is a base class; choose one of the generators: DiT, MLPGenerator"),
        (["--model.loss.field", "MeanShift", "--model.loss.field.affinity_floor", "-1"],
         "error: model.loss.field: affinity_floor must be >= 0, got -1.0"),
    ],
)  # fmt: skip
def test_a_bad_name_key_or_value_on_the_command_line_is_one_short_error(args, expected):
    out = run_drifting("fit", "--config", TOY, *args, *FAST)
    line = error_of(out)
    assert line.startswith(expected), line
    assert "DriftingModule" not in line or "generated_per_grup" in line  # no hint from another kind


def test_a_nested_component_that_refuses_its_arguments_is_named_by_its_key():
    # jsonargparse's error names only the top-level class (model) when the generator inside it refuses its preset
    digits = str(REPO / "configs" / "digits.yaml")
    line = error_of(run_drifting("fit", "--config", digits, "--model.generator.init_args.preset", "tiniest"))
    assert line.startswith("error: model.generator: unknown DiT preset 'tiniest'; valid presets: B/2, L/2"), line


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has one")
def test_an_accelerator_the_machine_lacks_is_named_with_the_fix(tmp_path: Path):
    line = error_of(run_drifting("fit", "--config", TOY, "--trainer.accelerator", "gpu",
                                 "--trainer.default_root_dir", str(tmp_path / "gpu"), *FAST))  # fmt: skip
    assert line == ("error: trainer.accelerator gpu: torch sees no such device on this machine; use "
                    "--trainer.accelerator cpu (or auto, which takes a GPU where there is one)")
    assert not (tmp_path / "gpu").exists()


def test_an_argument_of_a_component_the_config_leaves_at_its_default_says_to_name_one():
    # digits.yaml names no field: DriftingLoss uses MeanShift, which jsonargparse does not know about
    digits = str(REPO / "configs" / "digits.yaml")
    line = error_of(run_drifting("fit", "--config", digits, "--model.loss.field.normalization", "targets"))
    assert line == (
        "error: model.loss.field.normalization: the config names no field at model.loss.field (its default is used), "
        "so it has no arguments to set; name one first, e.g. --model.loss.field MeanShift "
        "--model.loss.field.normalization ... (choose from MMD, MeanShift, SinkhornDrift)"
    )


def _toy_with(tmp_path: Path, edit) -> str:
    config = yaml.safe_load(Path(TOY).read_text())
    edit(config)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _loss(config: dict) -> dict:
    return config["model"]["init_args"]["loss"]["init_args"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: _loss(c).update(kernel="Gausian"),
         f"error: model.loss.kernel: unknown kernel 'Gausian'; did you mean 'Gaussian'? Choose from {KERNELS}"),
        (lambda c: _loss(c)["field"].update(class_path="drifting_lightning.drift.fields.MeanShfit"),
         "error: model.loss.field: unknown field 'drifting_lightning.drift.fields.MeanShfit'; did you mean "
         "'MeanShift'?"),
        (lambda c: c["data"].update(class_path="ToyDataModul"),
         "error: data: unknown data module 'ToyDataModul'; did you mean 'ToyDataModule'"),
        (lambda c: c["model"]["init_args"].update(generated_per_grup=c["model"]["init_args"].pop("lr")),
         "error: model.generated_per_grup: DriftingModule has no argument 'generated_per_grup'; did you mean "
         "'generated_per_group'?"),
        (lambda c: _loss(c).update(temperatures=[-0.05]),
         "error: model.loss: temperatures must be a non-empty list of positive finite numbers, got [-0.05]"),
        (lambda c: c["trainer"].update(max_steps="lots"), "error: trainer.max_steps: expected an integer, got 'lots'"),
    ],
)  # fmt: skip
def test_the_same_mistakes_in_a_config_file_are_one_short_error(tmp_path: Path, edit, expected):
    out = run_drifting("fit", "--config", _toy_with(tmp_path, edit))
    assert error_of(out).startswith(expected)


def test_drifting_debug_keeps_the_full_report(monkeypatch):
    monkeypatch.setenv("DRIFTING_DEBUG", "1")
    out = run_drifting("fit", "--config", TOY, "--model.loss.kernel", "Foo")
    assert out.returncode == 2
    assert "Does not validate against any of the Union subtypes" in out.stderr
    assert len(out.stderr.splitlines()) > 10


# ---- help and the command table ------------------------------------------------------------------------------
COMMANDS = ("fit", "list", "sample", "evaluate", "export", "encode-latents", "import-official")


def test_help_lists_every_command_and_the_common_invocations():
    out = run_drifting("--help")
    assert out.returncode == 0
    listed = [line.split()[0] for line in out.stdout.split("Commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == list(COMMANDS)
    assert out.stdout.count("\n  drifting ") == 3  # the three most common invocations
    assert "--ckpt_path last" in out.stdout
    bare = run_drifting()  # no command: the same help, as a usage error
    assert bare.returncode == 2 and bare.stderr == out.stdout


@pytest.mark.parametrize("name", ["fitt", "validate", "predict"])
def test_an_unknown_command_lists_the_commands(name: str):
    out = run_drifting(name)
    assert out.returncode == 2
    line = error_of(out)
    assert line.startswith(f"error: unknown command '{name}';")
    assert line.endswith(f"from {', '.join(COMMANDS)} (drifting --help)")
    assert ("did you mean 'fit'?" in line) == (name == "fitt")


def test_list_help_and_fit_help():
    listed = run_drifting("list", "--help")
    assert listed.returncode == 0 and listed.stdout.startswith("usage: drifting list [kernels|fields|")
    fit = run_drifting("fit", "--help")
    assert fit.returncode == 0 and "--trainer.max_steps" in fit.stdout and "--resilience" in fit.stdout
    as_module = run_drifting_subprocess("fit", "--help")  # python -m drifting_lightning is the same program
    assert as_module.returncode == 0 and as_module.stdout.startswith("usage: drifting [options] fit")


# ---- the one error policy ---------------------------------------------------------------------------------------
def test_every_command_shares_the_error_policy(tmp_path: Path):
    from drifting_lightning.commands.encode_latents import main as encode_latents

    missing = str(tmp_path / "nowhere")
    for out in (run_drifting("encode-latents", "--data", missing, "--vae", missing, "--out", str(tmp_path / "o")),
                run_drifting("export", "--ckpt", missing + ".ckpt", "--out", str(tmp_path / "e"))):  # fmt: skip
        assert out.returncode == 1
        assert error_of(out).startswith("error: ") and missing in out.stderr
    assert encode_latents(["--data", missing, "--vae", missing, "--out", str(tmp_path / "o")]) == 1


def test_resilience_is_part_of_the_config():
    from drifting_lightning.callbacks.graceful_stop import GracefulStop
    from drifting_lightning.callbacks.rng import TrainingRNG
    from drifting_lightning.commands.fit import DriftingCLI

    printed = run_drifting("fit", "--config", TOY, "--print_config")
    assert yaml.safe_load(printed.stdout)["resilience"] is True
    common = ["--config", TOY, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    hardened = DriftingCLI(args=common, run=False).trainer
    assert any(isinstance(c, GracefulStop) for c in hardened.callbacks)
    assert any(isinstance(c, TrainingRNG) for c in hardened.callbacks)
    plain = DriftingCLI(args=[*common, "--resilience", "false"], run=False).trainer
    assert not any(isinstance(c, (GracefulStop, TrainingRNG)) for c in plain.callbacks)


def test_a_table_that_is_not_numbers_is_named_with_the_reason(tmp_path):
    table = tmp_path / "actions.csv"
    table.write_text("x,y\n1,2\n3,four\n")
    out = run_drifting("fit", "--config", TOY, "--data", "VectorDataModule", "--data.path", str(table), *FAST)
    line = error_of(out)
    assert line.startswith(f"error: data: {table}, line 3, column 2: not a number (could not convert string "
                           "'four'"), line  # fmt: skip


def test_our_callbacks_go_by_class_name_on_the_command_line():
    # the toy config names no FrechetCallback, so nothing else imports its module before parsing
    out = run_drifting("fit", "--config", TOY, "--trainer.callbacks+=FrechetCallback",
                       "--trainer.callbacks.metric", "classifier", "--print_config")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    added = yaml.safe_load(out.stdout)["trainer"]["callbacks"][-1]
    assert added["class_path"] == "drifting_lightning.callbacks.frechet.FrechetCallback"
    assert added["init_args"]["metric"] == "classifier"


def test_an_option_before_the_config_is_refused_as_the_file_would_override_it():
    out = run_drifting("fit", "--trainer.max_steps", "5", "--config", TOY)
    assert error_of(out) == ("error: --trainer.max_steps comes before --config: arguments apply in order, so the "
                             "config file would override it; put --config first (drifting fit --config FILE "
                             "--trainer.max_steps ...)")  # fmt: skip
    printed = run_drifting("fit", "--print_config", "--config", TOY)  # not an option of the run
    assert printed.returncode == 0 and "max_steps: 1500" in printed.stdout
    # the sections a config file may hold (unknown ones are refused) are the ones the parser writes
    from drifting_lightning.commands.fit import CONFIG_SECTIONS

    assert set(yaml.safe_load(printed.stdout)) == set(CONFIG_SECTIONS)
