"""The reproducible job zip (``lastlayer job package``): same folder, same bytes; links kept; refusals."""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from pathlib import Path

import pytest

from lastlayer.errors import DataError, UsageError
from lastlayer.jobs import archive, package


def make_poets(root: Path) -> Path:
    src = root / "poets"
    (src / "sub").mkdir(parents=True)
    (src / "poets.py").write_text("import retrain\n")
    (src / "retrain.py").write_text("def main():\n    pass\n")
    (src / "retrain.py").chmod(0o755)
    (src / "sub" / "data.txt").write_text("x")
    (src / "sub" / "alias.py").symlink_to("../poets.py")
    return src


def test_build_zip_is_reproducible_and_prefixed(tmp_path: Path):
    src = make_poets(tmp_path)
    names = package.build_zip(src, str(tmp_path / "a.zip"), root_name="dcos-tensorflow-demos-master/poets")
    assert names == [
        "dcos-tensorflow-demos-master/",
        "dcos-tensorflow-demos-master/poets/",
        "dcos-tensorflow-demos-master/poets/poets.py",
        "dcos-tensorflow-demos-master/poets/retrain.py",
        "dcos-tensorflow-demos-master/poets/sub/",
        "dcos-tensorflow-demos-master/poets/sub/alias.py",
        "dcos-tensorflow-demos-master/poets/sub/data.txt",
    ]
    os.utime(src / "poets.py", (1e9, 1e9))  # times do not matter
    package.build_zip(src, f"file://{tmp_path}/b.zip", root_name="dcos-tensorflow-demos-master/poets")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.zip", "b.zip")]
    assert digest[0] == digest[1]
    assert zipfile.ZipFile(tmp_path / "a.zip").namelist() == names
    extracted = archive.fetch_and_extract(str(tmp_path / "a.zip"), tmp_path / "job")
    assert extracted == names
    poets = tmp_path / "job" / "dcos-tensorflow-demos-master" / "poets"
    assert (poets / "sub" / "alias.py").is_symlink() and (
        poets / "sub" / "alias.py"
    ).read_text() == "import retrain\n"
    assert stat.S_IMODE((poets / "retrain.py").stat().st_mode) == 0o755


def test_build_zip_without_root_skips_its_own_output(tmp_path: Path):
    src = make_poets(tmp_path)
    package.build_zip(src, str(src / "poets.zip"))
    names = package.build_zip(src, str(src / "poets.zip"))  # the first zip is inside src now
    assert "poets.zip" not in names and names[0] == "poets.py"


def test_build_zip_refusals(tmp_path: Path):
    src = make_poets(tmp_path)
    with pytest.raises(UsageError, match=r"root_name '\.\./up': must be a relative folder name"):
        package.build_zip(src, str(tmp_path / "x.zip"), root_name="../up")
    with pytest.raises(UsageError, match="not a folder"):
        package.build_zip(src / "poets.py", str(tmp_path / "x.zip"))
    (src / "leak").symlink_to("/etc/passwd")
    with pytest.raises(DataError, match="a symbolic link to '/etc/passwd', outside"):
        package.build_zip(src, str(tmp_path / "x.zip"))
    assert not (tmp_path / "x.zip").exists()
