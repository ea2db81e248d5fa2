import subprocess
import sys


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "slipstream.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_misspelled_override_is_reported_by_name_without_traceback():
    r = _cli("train", "recipe=smoke", "trainer.stepz=3")
    assert r.returncode == 2
    assert "unknown config key 'trainer.stepz'. Did you mean 'trainer.steps'?" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_unknown_recipe_lists_the_recipes():
    r = _cli("train", "recipe=nope")
    assert r.returncode == 2 and "available recipes: default, smoke" in r.stderr


def test_print_config_and_recipes():
    r = _cli("train", "--print-config", "recipe=smoke", "trainer.steps=7")
    assert r.returncode == 0 and "steps: 7" in r.stdout and "name: tiny-random" in r.stdout
    r = _cli("recipes")
    assert r.returncode == 0 and "smoke" in r.stdout and "default" in r.stdout


def test_report_on_a_missing_run_is_a_clear_error(tmp_path):
    r = _cli("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and str(tmp_path / "nope") in r.stderr and "Traceback" not in r.stderr


def test_models_pull_of_an_unknown_name():
    r = _cli("models", "pull", "gpt-17")
    assert r.returncode == 2 and "smollm2-135m-instruct" in r.stderr
