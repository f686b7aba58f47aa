"""What a new user meets first: the distribution name, the docs the repository cites, the README's claims against
what the code reports, and ``python -m fastclip.build``."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_distribution_name_is_its_own():
    """`fastclip` on PyPI is someone else's package: the distribution is fastclip-torch, the import name fastclip."""
    project = _read("pyproject.toml").split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^name = "fastclip-torch"', project, re.M)
    assert 'fastclip = "fastclip.cli:main"' in _read("pyproject.toml")
    readme = _read("README.md")
    assert "pip install fastclip-torch" in readme and "import fastclip" in readme


def _tracked_text_files():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for path in files:
        if path.endswith((".py", ".md", ".sh", ".toml", ".cu", ".cuh", ".h", ".cpp", ".txt")) or path == ".ci/run":
            yield path


def test_docs_cite_only_files_users_have():
    """No file cites a DESIGN.md (a developers' note outside the repository); the design is docs/design.md."""
    this = os.path.relpath(__file__, ROOT)
    citing = [p for p in _tracked_text_files() if p != this and "DESIGN.md" in _read(p)]
    assert not citing, f"these cite DESIGN.md, which users do not have: {citing}"
    assert os.path.exists(os.path.join(ROOT, "docs", "design.md"))
    for path in re.findall(r"\]\(([^)#]+)\)", _read("README.md")):  # every relative link in the README resolves
        if "://" not in path:
            assert os.path.exists(os.path.join(ROOT, path)), path


def test_readme_backends_match_the_dispatcher():
    """The README's list of backends per op is what `fastclip info` reports (no CUDA SigLIP)."""
    import fastclip  # noqa: F401  (registers every op)
    from fastclip.dispatch import AUTO_ORDER, ops, supports

    readme = _read("README.md")
    for op in ops():
        names = [b for b in AUTO_ORDER if b in supports(op)]
        assert f"- `{op}`: " + ", ".join(f"`{b}`" for b in names) in readme, op


def test_readme_model_claim_comes_from_list_models():
    readme = _read("README.md")
    assert "every open_clip config" not in readme and "fastclip.list_models()" in readme


def test_build_module_runs_without_warnings():
    res = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "fastclip.build", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "found in sys.modules" not in res.stderr
    assert "same torch" in res.stdout  # the shared cache is stated where it is built


def _toolkit(path):
    os.makedirs(os.path.join(path, "bin"))
    os.makedirs(os.path.join(path, "include"))
    for f in ("bin/nvcc", "include/cuda_runtime.h"):
        open(os.path.join(path, f), "w").close()
    os.chmod(os.path.join(path, "bin", "nvcc"), 0o755)
    return str(path)


def test_find_cuda_home(tmp_path):
    from fastclip.build import find_cuda_home

    home = _toolkit(tmp_path / "cuda-12.8")
    assert find_cuda_home({"CUDA_HOME": home, "PATH": ""}) == (home, "$CUDA_HOME")
    assert find_cuda_home({"CUDA_PATH": home, "PATH": ""})[0] == home
    missing, why = find_cuda_home({"CUDA_HOME": str(tmp_path / "nope"), "PATH": ""})
    assert missing is None and "CUDA_HOME" in why and "nope" in why
    # nvcc on PATH through a link (a bin/ of links, as distributions install it): the toolkit behind the link
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(os.path.join(home, "bin", "nvcc"), links / "nvcc")
    assert find_cuda_home({"PATH": str(links)}) == (home, f"nvcc on PATH ({links / 'nvcc'})")


@pytest.mark.skipif(not os.path.exists("/usr/local/cuda/bin/nvcc"), reason="no /usr/local/cuda here")
def test_find_cuda_home_falls_back_to_usr_local_cuda(tmp_path):
    """A wrapper nvcc outside any toolkit (torch would guess its parent folder) does not hide /usr/local/cuda."""
    from fastclip.build import find_cuda_home

    (tmp_path / "nvcc").write_text("#!/bin/sh\nexec /usr/local/cuda/bin/nvcc \"$@\"\n")
    os.chmod(tmp_path / "nvcc", 0o755)
    assert find_cuda_home({"PATH": str(tmp_path)})[0] == "/usr/local/cuda"


def test_readme_says_the_build_cache_is_shared():
    readme = _read("README.md")
    assert "~/.cache/fastclip/torch-<version>/" in readme and "every" in readme.split("~/.cache/fastclip", 1)[1][:400]
