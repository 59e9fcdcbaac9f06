"""README's Python examples run as written: every ```python block of README.md is executed,
unedited, in a fresh namespace in a scratch directory; the API example must also give the
very images `fastdiff sample` gives for the same flags it names."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)
CLI_TWIN = re.compile(r"same images as\s+`fastdiff (sample [^`]*)`")  # the prose before the API example
BULK_TWIN = re.compile(r"the files of `fastdiff (sample [^`]*)`")  # the comment closing the bulk example


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 4 and sum("sampler_options(\"dpmpp_2m_sde\")" in b for b in BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_written(index, tmp_path, monkeypatch, capsys):
    code = BLOCKS[index]
    if "from diffusers import" in code:
        pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme_{index}"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if CLI_TWIN.search(README.read_text().split(code)[0][-300:]):  # the example the prose before it names
        _same_images_as_the_cli(namespace, tmp_path, capsys)
    if BULK_TWIN.search(code):
        _same_files_as_the_cli(BULK_TWIN.search(code).group(1).split(), tmp_path, capsys)


def _same_files_as_the_cli(argv, tmp_path, capsys):
    """The bulk example's files are those of the command its comment names, byte for byte."""
    from fastdiff.cli import main

    outdir = Path(argv[argv.index("--outdir") + 1])
    argv[argv.index("--outdir") + 1] = str(tmp_path / "cli")
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    python = sorted(p.name for p in outdir.glob("*.png"))
    assert python and python == sorted(p.name for p in (tmp_path / "cli").glob("*.png"))
    for name in python:
        assert (outdir / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def _same_images_as_the_cli(namespace, tmp_path, capsys):
    """The API example's x, drawn as the CLI draws its grid, is the CLI's image, byte for byte."""
    from PIL import Image

    from fastdiff.cli import main
    from fastdiff.sample_cmd import save_grid

    twin = CLI_TWIN.search(README.read_text())
    assert twin, "README names the CLI command its API example reproduces"
    argv = twin.group(1).split()
    assert main([*argv, "--out", str(tmp_path / "cli.png"), "--no-progress"]) == 0
    capsys.readouterr()
    rows = len(argv[argv.index("--classes") + 1].split(","))
    save_grid(namespace["x"], rows, tmp_path / "python.png", namespace["bundle"].data_range)
    cli, python = (np.asarray(Image.open(tmp_path / n)) for n in ("cli.png", "python.png"))
    assert cli.shape == python.shape and np.array_equal(cli, python)
