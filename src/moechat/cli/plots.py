"""An HTML template that makes `dvc plots show` render without internet.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so offline it shows nothing.
`offline.html` beside this file is a DVC `html_template` with the three libraries inlined; the
project's `.dvc/config` points `plots.html_template` at it, so plain `dvc plots show` writes a
self-contained `dvc_plots/index.html` (about 0.9 MB) that opens from disk, mail or a CI artifact.

The scripts come from the PyPI wheel `django-js-lib-vega-embed` (pinned in the `dev` extra; its files
are the upstream npm builds `vega/build/vega.min.js` etc. minus the trailing `sourceMappingURL`
comment). The template is committed because DVC only accepts a template *file*, which must exist in
a fresh clone; `python -m moechat.cli.plots` regenerates it after a pin bump, and
tests/cli/test_plots_offline.py fails if the committed file drifts from what the pinned wheel gives.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import os
import re
import tempfile
from pathlib import Path

# Distribution that ships the scripts, its import name, and the scripts in load order (vega-lite
# and vega-embed are UMD builds that read the `vega` / `vegaLite` globals defined before them).
JS_DISTRIBUTION = "django-js-lib-vega-embed"
JS_PACKAGE = "js_lib_vega_embed"
JS_DIR = "static/js_lib_vega_embed"
SCRIPTS = (("Vega", "vega5.js"), ("Vega Lite", "vega-lite5.js"), ("Vega Embed", "vega-embed6.js"))

# The three placeholders dvc_render.html.HTML substitutes. `{scripts}` is deliberately absent from our
# template: that is where DVC would insert its CDN <script> tags.
PLOT_DIVS = "{plot_divs}"
REFRESH_TAG = "{refresh_tag}"
DVC_PLACEHOLDERS = ("{scripts}", PLOT_DIVS, REFRESH_TAG)

TEMPLATE_NAME = "offline.html"


def template_path() -> Path:
    """Path of the committed, packaged template (what `.dvc/config` `plots.html_template` names)."""
    return Path(__file__).with_name(TEMPLATE_NAME)


def dvc_render_vega_lite_major() -> int:
    """Vega-Lite major version that dvc-render's spec templates declare in `$schema` (5 for 1.0.2)."""
    from dvc_render.vega_templates import LinearTemplate

    schema = LinearTemplate.DEFAULT_CONTENT["$schema"]
    match = re.search(r"/vega-lite/v(\d+)\.json$", schema)
    if match is None:
        raise RuntimeError(f"dvc_render LinearTemplate has an unexpected $schema {schema!r}")
    return int(match.group(1))


def bundled_versions() -> dict[str, str]:
    """Versions of vega, vega-lite and vega-embed in the installed JS wheel, e.g. {"Vega": "5.33.0"}.

    Read from the wheel's metadata (its README lists them as `- Vega Lite: 5.23.0`); the browser
    test checks the same numbers against the libraries' own `version` globals.
    """
    try:
        metadata = importlib.metadata.metadata(JS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise RuntimeError(
            f"{JS_DISTRIBUTION} is not installed; it ships the vega scripts the offline plots template "
            'inlines. Install the dev extra: pip install -e ".[dev]"'
        ) from err
    description = metadata.get_payload() or ""  # type: ignore[attr-defined]
    versions = dict(re.findall(r"^- (Vega(?: Lite| Embed)?): (\S+)\s*$", description, re.MULTILINE))
    missing = [name for name, _ in SCRIPTS if name not in versions]
    if missing:
        raise RuntimeError(
            f"{JS_DISTRIBUTION} {metadata['Version']} does not list versions for {missing} in its "
            "description; check which vega builds it ships before bumping the pin"
        )
    return versions


def _licence_text() -> str:
    files = importlib.metadata.files(JS_DISTRIBUTION) or []
    licences = [f for f in files if f.name.upper().startswith("LICENSE")]
    if not licences:
        raise RuntimeError(f"{JS_DISTRIBUTION} ships no LICENSE file; cannot redistribute its scripts")
    return licences[0].read_text(encoding="utf-8").strip()


def _read_script(filename: str) -> str:
    code = (importlib.resources.files(JS_PACKAGE) / JS_DIR / filename).read_text(encoding="utf-8")
    # Inside an inline <script>, "</script" ends the element and "<!--" switches the HTML parser into
    # an escaped state; either would corrupt the page. The pinned builds contain neither.
    for bad in ("</script", "<!--"):
        if bad in code.lower():
            raise RuntimeError(f"{JS_PACKAGE}/{JS_DIR}/{filename} contains {bad!r}; it cannot be inlined")
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in code:
            raise RuntimeError(
                f"{filename} contains DVC's placeholder {placeholder}; DVC would substitute inside it"
            )
    return code


def build_template() -> str:
    """Return the offline template: DVC's default page with the three libraries inlined.

    Raises RuntimeError when the installed scripts target a Vega-Lite major other than the one
    dvc-render writes specs for (a v5 spec on a v6 runtime renders wrongly or not at all).
    """
    versions = bundled_versions()
    vl_major = int(versions["Vega Lite"].split(".")[0])
    if vl_major != dvc_render_vega_lite_major():
        raise RuntimeError(
            f"{JS_DISTRIBUTION} ships Vega-Lite {versions['Vega Lite']}, but dvc-render writes "
            f"Vega-Lite v{dvc_render_vega_lite_major()} specs; pin a {JS_DISTRIBUTION} release with "
            f"Vega-Lite {dvc_render_vega_lite_major()}.x"
        )
    dist_version = importlib.metadata.version(JS_DISTRIBUTION)
    listing = ", ".join(f"{name} {versions[name]}" for name, _ in SCRIPTS)
    header = (
        f"Generated by `python -m moechat.cli.plots` from PyPI {JS_DISTRIBUTION}=={dist_version}: {listing}.\n"
        "Do not edit by hand. Licence of the inlined vega, vega-lite and vega-embed builds:\n\n"
        f"{_licence_text()}"
    )
    scripts = "\n".join(
        f"<script>/* {name} {versions[name]} */\n{_read_script(filename)}\n</script>"
        for name, filename in SCRIPTS
    )
    return (
        "<!DOCTYPE html>\n"
        f"<!--\n{header}\n-->\n"
        "<html>\n<head>\n"
        '<meta charset="utf-8">\n'
        f"{REFRESH_TAG}\n"
        "<title>DVC Plot</title>\n"
        f"{scripts}\n"
        "<style>\ntable {\n    border-spacing: 15px;\n}\n</style>\n"
        "</head>\n<body>\n"
        f"{PLOT_DIVS}\n"
        "</body>\n</html>\n"
    )


def write_template(path: Path) -> Path:
    """Write `build_template()` to `path` atomically (temp file + rename); return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(build_template())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the template is a readable package file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moechat.cli.plots",
        description="Regenerate the offline `dvc plots show` template from the pinned JS wheel.",
    )
    parser.add_argument("path", nargs="?", type=Path, default=template_path(),
                        help=f"where to write it (default: the packaged {TEMPLATE_NAME})")
    args = parser.parse_args(argv)
    out = write_template(args.path)
    versions = bundled_versions()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB; "
          + ", ".join(f"{name} {versions[name]}" for name, _ in SCRIPTS) + ")")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
