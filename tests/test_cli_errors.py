"""User errors on the command line end as one `error: ...` line, exit status 2, no traceback (unijax/cli.py).

Every case fails before any model is built: a subprocess costs only its imports (~2-5 s), and all of
them are started at once by one fixture, so the file takes seconds of wall time.
"""

import pathlib
import subprocess
import sys

import envs
import pytest

from unijax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]

# name: (command line after `python -m`, strings the last stderr line must contain); {tmp} is a
# fresh directory holding an empty subdirectory `empty/`.
CASES = {
    "train_misspelt_key": (["unijax.train", "--config", "configs/stage2.py", "--config.train.stpes=3"],
                           ["--config.train.stpes", "'stpes'", '"steps"']),
    "train_wrong_type": (["unijax.train", "--config", "configs/stage2.py", "--config.train.steps=abc"],
                         ["--config.train.steps=abc", "int"]),
    "train_missing_config_file": (["unijax.train", "--config", "{tmp}/nope.py"], ["{tmp}/nope.py"]),
    "convert_missing_dir": (["unijax.convert", "--hf_dir", "{tmp}/missing", "--out", "{tmp}/out1"],
                            ["{tmp}/missing"]),
    "convert_dir_without_config": (["unijax.convert", "--hf_dir", "{tmp}/empty", "--out", "{tmp}/out2"],
                                   ["{tmp}/empty/config.json"]),
    "generate_missing_ckpt": (["unijax.generate", "--ckpt", "{tmp}/no_ckpt", "--prompt", "a red circle"],
                              ["{tmp}/no_ckpt"]),
    "evaluate_missing_ckpt": (["unijax.evaluate", "--ckpt", "{tmp}/no_ckpt", "--suite", "shapes_pope"],
                              ["{tmp}/no_ckpt"]),
    "evaluate_unknown_suite": (["unijax.evaluate", "--ckpt", "{tmp}/no_ckpt", "--suite", "no_such_suite"],
                               ["--suite", "'no_such_suite'"]),
    "plan_misspelt_key": (["unijax.plan", "--config", "configs/stage2.py", "--config.train.stpes=3"],
                          ["--config.train.stpes", "'stpes'"]),
    "plan_bad_mesh": (["unijax.plan", "--config", "configs/stage2.py", "--mesh", "data=x"], ["--mesh", "data=x"]),
    "analyze_missing_ckpt": (["unijax.analyze", "experts", "--ckpt", "{tmp}/no_ckpt"], ["{tmp}/no_ckpt"]),
    "analyze_unknown_command": (["unijax.analyze", "expertz", "--ckpt", "{tmp}/no_ckpt"], ["expertz"]),
    "upcycle_missing_base": (["unijax.upcycle", "--base", "{tmp}/no_base", "--out", "{tmp}/up"], ["{tmp}/no_base"]),
    "reproduce_no_seeds": (["unijax.reproduce", "--seeds", ",", "--out", "{tmp}/r"], ["--seeds"]),
    "reproduce_base_from_not_a_base": (["unijax.reproduce", "--base_from", "{tmp}/empty", "--out", "{tmp}/r2"],
                                       ["--base_from {tmp}/empty", "{tmp}/empty/prerequisites/stage0_lm/model/model.json"]),
    "pack_nothing": (["unijax.pack", "--out", "{tmp}/packed"], ["--mmu", "--t2i"]),
    "pack_missing_file": (["unijax.pack", "--mmu", "{tmp}/no.json", "--out", "{tmp}/packed2"], ["{tmp}/no.json"]),
    "train_bad_overflow": (["unijax.train", "--config", "configs/stage2.py", "--config.data.overflow=cut"],
                           ["data.overflow='cut'"]),
    "train_config_syntax_error": (["unijax.train", "--config", "{tmp}/bad_cfg.py"],
                                  ["{tmp}/bad_cfg.py:1:", "syntax"]),
    "train_negative_learning_rate": (["unijax.train", "--config", "configs/stage2.py", "--config.train.learning_rate=-1"],
                                     ["train.learning_rate=-1", "positive"]),
    "generate_nan_cfg": (["unijax.generate", "--ckpt", "{tmp}/no_ckpt", "--prompt", "a", "--cfg", "nan"],
                         ["--cfg=nan"]),
    "generate_too_many_images": (["unijax.generate", "--ckpt", "{tmp}/no_ckpt", "--prompt", "a", "--num_images",
                                  "1000000000"], ["--num_images=1000000000", "more than 1024"]),
    "verbose_train_misspelt_key": (["unijax.train", "--config", "configs/stage2.py", "--config.train.stpes=3",
                                    "--verbosity=1"], ["--config.train.stpes"]),
    "verbose_convert_missing_dir": (["unijax.convert", "--hf_dir", "{tmp}/missing", "--out", "{tmp}/out3",
                                     "--verbosity", "1"], ["{tmp}/missing"]),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """name -> (exit status, stderr, tmp) of every case, the subprocesses run concurrently."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "empty").mkdir()
    (tmp / "bad_cfg.py").write_text("def get_config(:\n")
    procs = {name: subprocess.Popen([sys.executable, "-m", *(a.format(tmp=tmp) for a in args)], cwd=REPO,
                                    env=envs.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in CASES.items()}
    out = {}
    for name, p in procs.items():
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        out[name] = (p.returncode, err, tmp)
    return out


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_line(results, name):
    status, err, tmp = results[name]
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert lines and lines[-1].startswith("error: "), err
    for s in CASES[name][1]:
        assert s.format(tmp=tmp) in lines[-1], err
    assert "\\n" not in lines[-1], err  # no repr'd message
    if name.startswith("verbose_"):
        assert "Traceback (most recent call last)" in err, err
    else:
        assert "Traceback" not in err and len(lines) == 1, err


def test_message_unwraps_config_dict_key_errors():
    e = AttributeError(KeyError("'stpes'\nDid you mean \"steps\" instead of \"stpes\"?"))
    assert cli.message(e) == "unknown key 'stpes'; Did you mean \"steps\" instead of \"stpes\"?"
    assert cli.message(KeyError("shapes_popx")) == "unknown key 'shapes_popx'"
    assert cli.message(FileNotFoundError(2, "No such file or directory", "x.py")) == \
        "No such file or directory: 'x.py'"


def test_verbosity_from_argv():
    assert cli.verbosity(["--config", "c.py"]) == -1
    assert cli.verbosity(["--verbosity=1"]) == cli.verbosity(["--verbosity", "1"]) == cli.verbosity(["-v", "1"]) == 1
    assert cli.verbosity(["-v", "1"], short=False) == -1


def test_run_argparse(capsys):
    import argparse

    def main(argv):
        p = argparse.ArgumentParser()
        p.add_argument("--n", type=int)
        n = p.parse_args(argv).n
        if n < 0:
            raise ValueError(f"--n={n} must be >= 0")
        return 1 / n  # n == 0: a bug

    with pytest.raises(SystemExit) as e:
        cli.run_argparse(main, ["--n", "x"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: argument --n: invalid int value: 'x'\n"
    with pytest.raises(SystemExit) as e:
        cli.run_argparse(main, ["--n", "-1", "--verbosity=0"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: --n=-1 must be >= 0\n"
    with pytest.raises(ZeroDivisionError):  # not a user error: the traceback stays
        cli.run_argparse(main, ["--n", "0"])
    with pytest.raises(SystemExit) as e:
        cli.run_argparse(main, ["--n", "1"])
    assert e.value.code == 0
    assert argparse.ArgumentParser.error is not cli._raise_parse_error  # restored
