"""Open the HTML reports in a real headless browser (Chromium) and check that they render; take screenshots.

For each page: a copy with a small checking script appended is loaded with
``--dump-dom``; the script runs when the page has loaded and writes what it
found (images, decoded images, page size) into the DOM. Chromium's log on
stderr (``--enable-logging=stderr``) carries every console message, including
Content-Security-Policy violations (the report forbids any network load), and
a clean page has none. Then the page itself (without the script) is
screenshotted at 1280 px width over its whole height, and cut into tiles of
one screen each, for a person to look at.

Usage::

    python benchmarks/html_check.py [--out DIR] [--zoo]

builds the reports of ``models/digits_cnn.onnx`` (a sweep with calibration and
labelled eval inputs, a sweep page without matplotlib, and a ``decompose --html``
page) — with ``--zoo`` also a sweep of the zoo's ResNet-18 at 224×224 — checks
each, writes screenshots to ``DIR`` (default: a fresh temporary folder) and the
results to ``benchmarks/results/html_check.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WIDTH = 1280
TILE_HEIGHT = 1000

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]

CHECKER = """<script>
// runs in the load event, when every image has loaded (or failed): synchronous, so --dump-dom always sees its result
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const out = document.createElement('pre');
  out.id = 'render-check';
  out.textContent = JSON.stringify({images: images.length, decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    sizes: images.map(i => [i.naturalWidth, i.naturalHeight]), height: document.documentElement.scrollHeight,
    width: document.documentElement.scrollWidth});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    """The Chromium executable (Debian's ``chromium`` package), or ``None``."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageCheck:
    """What the browser saw of one page."""

    page: str
    images: int
    decoded: int
    image_sizes: list[list[int]]
    height: int
    width: int
    console: list[str] = field(default_factory=list)  # console messages (errors, CSP violations): none on a clean page
    screenshots: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.images == self.decoded and not self.console and self.width <= WIDTH


def _run(browser: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout, check=False
        )


def console_messages(stderr: str) -> list[str]:
    """The console lines of Chromium's log (``INFO:CONSOLE(…)`` and its newer ``INFO:CONSOLE:n`` form)."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[(:]", line)]


def check_page(page: Path, shots: Path | None = None, browser: str | None = None) -> PageCheck:
    """Load ``page`` in headless Chromium: count decoded images, collect console messages, optionally screenshot it."""
    browser = browser or chromium()
    if browser is None:
        raise RuntimeError("chromium is not installed (Debian: apt-get install chromium)")
    text = page.read_text(encoding="utf-8")
    # the checking script needs inline scripts, which the report's own policy forbids
    probe_text = text.replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src 'unsafe-inline'", 1)
    probe_text = probe_text.replace("</body>", CHECKER + "</body>", 1)
    with tempfile.TemporaryDirectory(prefix="html-check-") as tmp:
        probe = Path(tmp) / page.name
        probe.write_text(probe_text, encoding="utf-8")
        proc = _run(browser, [f"--window-size={WIDTH},900", "--virtual-time-budget=15000", "--dump-dom", probe.as_uri()])
    found = re.search(r'<pre id="render-check">([^<]*)</pre>', proc.stdout)
    if found is None:
        raise RuntimeError(f"{page}: the page did not finish loading in Chromium (exit {proc.returncode}): {proc.stderr[-500:]}")
    seen = json.loads(found.group(1).replace("&quot;", '"'))
    console = console_messages(proc.stderr)
    check = PageCheck(str(page), seen["images"], seen["decoded"], seen["sizes"], seen["height"], seen["width"], console)
    if shots is not None:
        # the page as a user opens it: no checking script; its console must be clean too
        png = shots / f"{page.stem}.png"
        shot = _run(browser, [f"--window-size={WIDTH},{check.height}", f"--screenshot={png}", page.as_uri()])
        check.console += [c for c in console_messages(shot.stderr) if c not in check.console]
        if png.is_file():
            check.screenshots = [str(p) for p in _tiles(png)]
    return check


def _tiles(png: Path) -> list[Path]:
    """The full-page screenshot cut into screens of TILE_HEIGHT pixels (Pillow, which matplotlib brings); else the whole."""
    try:
        from PIL import Image
    except ImportError:
        return [png]
    out = []
    with Image.open(png) as image:
        for i, top in enumerate(range(0, image.height, TILE_HEIGHT)):
            tile = png.with_name(f"{png.stem}-{i + 1:02d}.png")
            image.crop((0, top, image.width, min(top + TILE_HEIGHT, image.height))).save(tile)
            out.append(tile)
    return out


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "onnx_lowrank", *args], check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the pages and screenshots (default: a new temporary folder)")
    parser.add_argument("--zoo", action="store_true", help="also a sweep of the zoo's ResNet-18 at 224x224 (exports it once)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per target (default 20)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="onnx-lowrank-html-"))
    out.mkdir(parents=True, exist_ok=True)
    models = ROOT / "models"
    runs = str(args.runs)
    digits = str(models / "digits_cnn.onnx")
    test, calibration = str(models / "digits_test.npz"), str(models / "digits_calibration.npz")
    pages: dict[str, int] = {}  # page -> images expected

    _cli(
        "sweep",
        digits,
        "--eval-inputs",
        test,
        "--calibration",
        calibration,
        "--runs",
        runs,
        "--profile",
        "--html",
        str(out / "digits_sweep.html"),
    )
    pages["digits_sweep.html"] = 4  # trade-off, spectra, MACs per layer, kernel time
    _cli("decompose", digits, str(out / "digits_2x.onnx"), "--verify-inputs", test, "--html", str(out / "digits_decompose.html"))
    pages["digits_decompose.html"] = 3  # spectra, MACs per layer, kernel time

    # the page a user without matplotlib gets: the same tables and the hint
    sys.path.insert(0, str(ROOT))
    from onnx_lowrank.html_report import sweep_html
    from onnx_lowrank.sweep import sweep

    result = sweep(digits, [1.5, 2, 3], eval_inputs=test, runs=3)
    (out / "digits_sweep_noplots.html").write_text(sweep_html(result, plots=False), encoding="utf-8")
    pages["digits_sweep_noplots.html"] = 0

    if args.zoo:
        from models.make_zoo import cached

        resnet = cached("resnet18-bnfolded", 224)
        _cli("sweep", str(resnet), "--runs", runs, "--profile", "--html", str(out / "resnet18_sweep.html"))
        pages["resnet18_sweep.html"] = 4

    browser = chromium()
    if browser is None:
        sys.exit("chromium is not installed (Debian: apt-get install chromium)")
    version = subprocess.run([browser, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    checks = []
    for page, expected in pages.items():
        check = check_page(out / page, out, browser)
        ok = check.clean and check.images == expected
        print(
            f"{page}: {check.decoded}/{check.images} images decoded (expected {expected}), {len(check.console)} console messages, "
            f"{check.width}x{check.height} px -> {'OK' if ok else 'FAIL'}"
        )
        for line in check.console:
            print(f"  console: {line}")
        checks.append({**asdict(check), "expected_images": expected, "ok": ok})
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = [{k: v for k, v in c.items() if k not in ("page", "screenshots")} | {"page": Path(c["page"]).name} for c in checks]
    (RESULTS / "html_check.json").write_text(json.dumps({"browser": version, "pages": summary}, indent=2) + "\n")
    print(f"pages and screenshots in {out}")
    if not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
