"""The wheel: every file under src/unclip ships (the default model, the judge, the prompts, the
page, the fonts: package-data in pyproject.toml), nothing outside the package does, and a wheel
unpacked away from the repository finds its data inside itself.

The wheel is built from a copy of the checkout, as `pip wheel .` builds it, so the repository gets no
build/ folder and the build's own leftovers (build/lib, *.egg-info) cannot hide a missing pattern.
"""

import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "unclip"
CACHES = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _package_files() -> set[str]:
    """Every file of the package as the wheel names it (unclip/...), modules and data alike."""
    return {f"unclip/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """pyproject.toml and the other top-level files, src/ and tests/ of the checkout, plus a run and an
    output folder as a developer's checkout holds them (the environments and old builds stay behind)."""
    tree = tmp_path_factory.mktemp("checkout")
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, tree)
    for folder in ("src", "tests"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=CACHES)
    for decoy in ("runs/shapes/clip/model/model.safetensors", "out/demo/generate.png"):
        (tree / decoy).parent.mkdir(parents=True, exist_ok=True)
        (tree / decoy).write_bytes(b"not for the wheel")
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation",
                            "--quiet", "--disable-pip-version-check", "-w", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (path,) = out.glob("unclip-*.whl")
    return path


def test_the_wheel_holds_every_package_file_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _package_files()
    # the data the code reads at run time is among them, so an empty or renamed folder fails here too
    for data in ("assets/model/unclip.json", "assets/model/decoder/diffusion_pytorch_model.safetensors",
                 "assets/model/tokenizer/tokenizer.json", "assets/fonts/NotoSansThai-Regular.ttf",
                 "eval/judge/judge.safetensors", "eval/prompts.jsonl", "serve/static/index.html",
                 "serve/static/app.js", "serve/static/style.css"):
        assert f"unclip/{data}" in expected
    assert sorted(expected - names) == [], "package-data in pyproject.toml misses these files"
    assert sorted(n for n in names if n.startswith("unclip/")) == sorted(expected)
    # no tests, runs or outputs: only the package and its metadata
    assert [n for n in names if not n.startswith("unclip/") and not re.match(r"unclip-[^/]+\.dist-info/", n)] == []
    assert any(re.match(r"unclip-[^/]+\.dist-info/(licenses/)?LICENSE$", n) for n in names)  # MIT, with the code


def test_an_unpacked_wheel_finds_its_model_judge_prompts_page_and_fonts_inside_itself(wheel, tmp_path):
    """Run from a folder outside the repository with the unpacked wheel first on sys.path: every
    default the code looks up resolves inside the wheel and verifies against its manifest."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    check = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        from pathlib import Path
        import unclip
        from unclip.data.preview import font
        from unclip.eval.judge import default_judge_dir, load_judge
        from unclip.eval.prompts import read_prompts
        from unclip.modeldir import read_manifest, verify_files
        from unclip.pipeline import default_model_dir
        from unclip.serve.app import STATIC

        here = Path(unclip.__file__).resolve().parent
        assert here == Path({str(site / "unclip")!r}).resolve(), here
        for path in (default_model_dir(), default_judge_dir(), STATIC):
            assert here in path.parents, path
        verify_files(default_model_dir(), read_manifest(default_model_dir()), checksums=True)
        load_judge(default_judge_dir())
        assert len(read_prompts()) > 0
        assert {{p.name for p in STATIC.iterdir()}} >= {{"index.html", "app.js", "style.css"}}
        assert here in Path(font("th", 12).path).resolve().parents
    """)
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
