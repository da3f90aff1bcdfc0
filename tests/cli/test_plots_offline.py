"""`dvc plots show` renders without internet through moechat's offline template.

The structural tests always run (a tiny DVC repo with a dvclive-style loss TSV). The browser test runs
where Debian's chromium is installed: it renders the page with every host unresolvable and checks,
pixel by pixel, that a descending loss curve was drawn, and that DVC's default CDN page, rendered the
same way, draws nothing (so the check can fail).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from dvc.config import Config

from moechat.cli.plots import SCRIPTS, build_template, bundled_versions, dvc_render_vega_lite_major, template_path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
STEPS = list(range(0, 200, 5))
LOSSES = [4.0 * math.exp(-s / 50) + 1.5 for s in STEPS]  # strictly decreasing


class _Scripts(HTMLParser):
    """Collects every <script>: its attributes and inline body."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append((dict(attrs), ""))
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)


def parse_scripts(html: str) -> list[tuple[dict[str, str | None], str]]:
    parser = _Scripts()
    parser.feed(html)
    return parser.scripts


def remote_script_sources(html: str) -> list[str]:
    return [a["src"] for a, _ in parse_scripts(html) if a.get("src") and re.match(r"(https?:)?//", a["src"])]


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """index.html from `dvc plots show` with our template ("offline") and with DVC's default ("cdn")."""
    repo = tmp_path_factory.mktemp("plots_repo")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    tsv = repo / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("step\tloss\n" + "".join(f"{s}\t{l:.5f}\n" for s, l in zip(STEPS, LOSSES)))
    (repo / "dvc.yaml").write_text("plots:\n  - dvclive/plots/metrics:\n      x: step\n")
    runs = {"offline": ["--html-template", str(template_path())], "cdn": []}
    out = {}
    for name, extra in runs.items():
        subprocess.run(
            [sys.executable, "-m", "dvc", "plots", "show", "-o", f"out_{name}", *extra],
            cwd=repo, check=True, capture_output=True, text=True,
        )
        out[name] = repo / f"out_{name}" / "index.html"
    return out


def test_project_dvc_config_points_at_packaged_template() -> None:
    value = Config(dvc_dir=str(ROOT / ".dvc"))["plots"]["html_template"]
    # DVC resolves a relative html_template against the .dvc directory (dvc/commands/plots.py).
    assert (ROOT / ".dvc" / value).resolve() == template_path().resolve()
    assert template_path().is_file()


def test_committed_template_matches_pinned_wheel() -> None:
    assert template_path().read_text(encoding="utf-8") == build_template(), (
        "src/moechat/cli/offline.html is stale: run `python -m moechat.cli.plots`"
    )


def test_bundled_vega_lite_matches_dvc_render_schema(pages: dict[str, Path]) -> None:
    html = pages["offline"].read_text(encoding="utf-8")
    schema_majors = {int(m) for m in re.findall(r"vega\.github\.io/schema/vega-lite/v(\d+)\.json", html)}
    assert schema_majors == {dvc_render_vega_lite_major()} == {5}
    assert int(bundled_versions()["Vega Lite"].split(".")[0]) == 5


def test_offline_page_has_no_remote_scripts_and_inlines_vega(pages: dict[str, Path]) -> None:
    cdn_html = pages["cdn"].read_text(encoding="utf-8")
    # The detector bites on DVC's default page, which loads all three libraries from a CDN.
    assert len(remote_script_sources(cdn_html)) == 3

    html = pages["offline"].read_text(encoding="utf-8")
    assert remote_script_sources(html) == []
    assert all("src" not in attrs for attrs, _ in parse_scripts(html))  # nothing to find on disk
    assert not any(p in html for p in ("{scripts}", "{plot_divs}", "{refresh_tag}"))
    bodies = [body for _, body in parse_scripts(html)]
    versions = bundled_versions()
    for (name, _), global_name in zip(SCRIPTS, ("vega", "vegaLite", "vegaEmbed")):
        assert any(f"/* {name} {versions[name]} */" in b for b in bodies), name
        assert any(f".{global_name}=" in b for b in bodies), f"no UMD build defining {global_name}"
    # The plot div calls vegaEmbed with the whole loss series inline.
    (embed,) = [b for b in bodies if "vegaEmbed('#" in b]
    shown = [float(v) for v in re.findall(r'"loss": "([0-9.]+)", "rev"', embed)]
    assert shown == pytest.approx(LOSSES, abs=1e-4)


# --- browser check -------------------------------------------------------------------------------


def read_png_rgb(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into RGB rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color_type, _, _, interlace = header
    if depth != 8 or color_type not in (2, 6) or interlace:
        raise ValueError(f"{path}: unsupported PNG depth={depth} color_type={color_type}")
    bpp = 3 if color_type == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        prev = line
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
    return width, height, rows


def screenshot(page: Path, png: Path, profile: Path) -> list[str]:
    """Render `page` headless with no network into `png`; return the page's uncaught JS errors."""
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no host resolves: the page must need no network
        "--virtual-time-budget=10000", "--window-size=900,600", f"--screenshot={png}", page.as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot (rc={result.returncode}): {result.stderr[-2000:]}"
    return [line for line in result.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]


def curve_pixels(png: Path, hex_color: str) -> list[tuple[int, int]]:
    """(x, y) of pixels within a small distance of the series colour."""
    target = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    width, _, rows = read_png_rgb(png)
    return [
        (x, y)
        for y, row in enumerate(rows)
        for x in range(width)
        if sum(abs(row[3 * x + k] - target[k]) for k in range(3)) < 60
    ]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_chromium_draws_descending_loss_curve_offline(pages: dict[str, Path], tmp_path: Path) -> None:
    html = pages["offline"].read_text(encoding="utf-8")
    # dvc-render colours the series by revision; the spec names the colour it drew with.
    (color,) = re.findall(r'"range": \["(#[0-9a-fA-F]{6})"\]', html)

    shot = tmp_path / "offline.png"
    errors = screenshot(pages["offline"], shot, tmp_path / "profile")
    assert errors == []
    pixels = curve_pixels(shot, color)
    assert len(pixels) > 300, f"only {len(pixels)} pixels of the loss colour {color}: no curve drawn"
    xs = sorted({x for x, _ in pixels})
    quarter = (xs[-1] - xs[0]) // 4
    top_y = {x: min(y for px, y in pixels if px == x) for x in xs}
    left = sorted(top_y[x] for x in xs if x <= xs[0] + quarter)
    right = sorted(top_y[x] for x in xs if x >= xs[-1] - quarter)
    # Screen y grows downwards: a falling loss sits higher on the left than on the right.
    assert left[len(left) // 2] + 100 < right[len(right) // 2], (left, right)

    control = tmp_path / "cdn.png"
    control_errors = screenshot(pages["cdn"], control, tmp_path / "profile_cdn")
    assert any("vegaEmbed is not defined" in e for e in control_errors)  # the error check bites too
    assert len(curve_pixels(control, color)) < 20, "DVC's CDN page drew a chart with no network?"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_chromium_runs_the_bundled_versions(pages: dict[str, Path], tmp_path: Path) -> None:
    """The libraries report the versions the template claims, and vega-embed drew a canvas."""
    probe = tmp_path / "probe.html"
    script = (
        "<script>const out = document.createElement('pre'); out.setAttribute('id', 'probe-out');"
        "out.textContent = JSON.stringify({vega: vega.version, vegaLite: vegaLite.version,"
        " vegaEmbed: vegaEmbed.version}); document.body.appendChild(out);</script>"
    )
    # vega-embed's own code contains the string "</body>": insert before the page's last one.
    head, tag, tail = pages["offline"].read_text(encoding="utf-8").rpartition("</body>")
    probe.write_text(head + script + tag + tail, encoding="utf-8")
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    match = re.search(r'<pre id="probe-out">(.*?)</pre>', dom)
    assert match, "probe script did not run"
    reported = json.loads(match.group(1).replace("&quot;", '"'))
    expected = bundled_versions()
    assert reported == {"vega": expected["Vega"], "vegaLite": expected["Vega Lite"],
                        "vegaEmbed": expected["Vega Embed"]}
    embed = re.search(r'<div id="dvclive_plots_metrics_train_loss_tsv" class="vega-embed[^"]*">(.*)', dom, re.S)
    assert embed and re.search(r'<canvas width="\d+" height="\d+" class="marks"', embed.group(1))


@pytest.fixture(scope="module")
def project_plots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """`dvc plots show --json` of the project's own `plots:` definitions over small curve files."""
    import yaml

    repo = tmp_path_factory.mktemp("project_plots")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    shutil.copytree(ROOT / "dvc_templates", repo / "dvc_templates")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    live = repo / "metrics" / "train" / "plots"
    for name in ("lm_loss", "aux_loss", "z_loss"):
        for split in ("train", "val"):
            path = live / "metrics" / split / f"{name}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"step\t{name}\n1\t2.0\n2\t1.5\n")
    shares = live / "expert_shares" / "layer1.tsv"
    shares.parent.mkdir(parents=True)
    shares.write_text("step\tseries\tshare\n" + "".join(
        f"{step}\t{series}\t0.1\n" for step in (1, 2) for series in [f"expert{e}" for e in range(10)] + ["dropped"]))
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=repo, check=True,
                           capture_output=True, text=True).stdout
    return {plot_id: renders[0]["content"] for plot_id, renders in json.loads(shown)["data"].items() if renders}


def test_project_plots_have_titles_and_axis_labels_not_paths(project_plots: dict[str, dict]) -> None:
    shares = next(spec for plot_id, spec in project_plots.items() if plot_id.endswith("expert_shares/layer1.tsv"))
    assert shares["title"] == "Expert token shares during training (one chart per MoE layer)"
    line = shares["layer"][0]["encoding"]
    assert (line["x"]["title"], line["y"]["title"]) == ("optimizer step", "share of routed tokens")
    # each chart names its layer (from the file name DVC adds to every row)
    assert "filename" in shares["data"]["values"][0] and "moe_layer" == shares["layer"][1]["encoding"]["text"]["field"]
    router = next(spec for plot_id, spec in project_plots.items() if plot_id.startswith("Router losses"))
    assert json.dumps(router).count('"router loss (unweighted)"') >= 1 and '"title": "y"' not in json.dumps(router)


def test_expert_share_colours_are_distinct_for_ten_experts_and_dropped() -> None:
    template = json.loads((ROOT / "dvc_templates" / "expert_shares.json").read_text())
    colours = template["layer"][0]["encoding"]["color"]["scale"]["range"]
    assert len(set(colours)) == len(colours) >= 11  # the reference model: 10 experts + dropped
