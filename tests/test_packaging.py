import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_non_editable_install_ships_conf_and_recipes(tmp_path):
    target = tmp_path / "site"
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target", str(target),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    probe = ("import slipstream.config as C; "
             "print(C.conf_dir()); print(','.join(C.available_recipes())); "
             "print(C.compose(['recipe=smoke']).model.name)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    conf, recipes, model = out.stdout.split()
    assert Path(conf).is_relative_to(target) and (Path(conf) / "config.yaml").is_file()
    assert {"default", "smoke", "smollm2-gpu"} <= set(recipes.split(","))
    assert model == "tiny-random"
