"""`dreamd report` on a real short run, read as a person reads it: in headless Chromium.

One module-scoped run: `dreamd init` (tiny llama), 3 cycles with the model dreamer mixed in
(the random tiny model's drafts are rejected with their reasons, templates fill the quota) and
a controller that judges after 2 steps, so the store holds steps, a baseline, every metric the
evaluation writes, decisions that change settings, and accepted and rejected scenarios.

The browser test renders the page at desktop and phone widths, checks what a machine can (no
horizontal overflow, axis labels on every plot, integer cycle and step ticks, a meaning and a
direction for every metric) and keeps full-page screenshots as artefacts under
$DREAMD_TEST_ARTEFACTS/report (default: the test's tmp dir; the path is printed). It is skipped
when no Chromium is installed (.ci/run installs it when it can).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dreamd.config_file import load_config
from dreamd.evals.metric_names import METRICS
from dreamd.evals.report import load_run, write_report
from dreamd.evals.report_plots import CYCLE_AXIS, PANELS
from dreamd.store.record import Store
from tests.conftest import init_setup

RUN_ENV = {
    "DREAMD_MIX__EXAMPLES_PER_CYCLE": "8",
    "DREAMD_EVAL__ARITHMETIC_N": "4",
    "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "256",
    "DREAMD_DREAM__SOURCE": "mixed",  # the tiny model's drafts: real rejections with reasons
    "DREAMD_EVAL__FULL_EVERY": "1",  # every metric and a controller decision on every cycle
    "DREAMD_DREAM__SITUATION_MAX_TOKENS": "32",
    "DREAMD_DREAM__REPLY_MAX_TOKENS": "32",
    "DREAMD_DREAM__JUDGE_MAX_TOKENS": "16",
    "DREAMD_CONTROLLER__WAIT_STEPS": "2",  # decisions that change settings within 3 cycles
    "DREAMD_LOG_FORMAT": "json",
}
WIDTHS = {"desktop": 1280, "narrow": 390}
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

CHECK_JS = """<script>
window.addEventListener('load', () => {
  const W = window.innerWidth, r = {innerWidth: W, scrollWidth: document.documentElement.scrollWidth,
    scrollHeight: document.documentElement.scrollHeight};
  r.figures = [...document.querySelectorAll('figure')].map(f => ({xlabel: f.dataset.xlabel,
    ylabel: f.dataset.ylabel, xticks: f.dataset.xticks, metrics: f.dataset.metrics,
    loaded: f.querySelector('img').naturalWidth > 0, right: f.getBoundingClientRect().right}));
  r.metricRows = [...document.querySelectorAll('table.metrics tbody tr:not(.sub)')]
    .map(tr => [...tr.cells].map(td => td.textContent.trim()));
  r.beyond = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > W + 0.5)
    .map(e => e.tagName + '.' + e.className).slice(0, 10);
  parent.postMessage(JSON.stringify(r), '*');
});
</script>"""
FRAME = """<!doctype html><html><body style="margin:0">
<iframe src="{src}" style="border:0;display:block;width:{width}px;height:{height}px"></iframe>
<script>addEventListener('message', e => {{ const out = document.createElement('pre');
  out.id = 'dreamd-check'; out.textContent = e.data; document.body.appendChild(out); }});</script>
</body></html>"""
MIN_WINDOW = 500  # headless Chromium's narrowest window: narrower widths are an iframe inside it


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report-run")
    init_setup(root)
    subprocess.run([sys.executable, "-m", "dreamd", "run", "--config", str(root / "dreamd.toml"), "--cycles", "3",
                    "--now"], env={**os.environ, **RUN_ENV}, check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def report(real_run: Path) -> Path:
    return write_report(load_config(real_run / "dreamd.toml", environ={}), real_run / "report")


def test_every_metric_the_run_wrote_has_a_meaning_and_a_panel(real_run: Path) -> None:
    store = Store.open_existing(load_config(real_run / "dreamd.toml", environ={}).store_url)
    written = set(store.metric_names(1))
    store.close()
    assert len(written) > 30 and written <= set(METRICS), f"no entry in METRICS for {written - set(METRICS)}"
    assert {m for p in PANELS for m in p.metrics} == set(METRICS)  # every known metric is plotted
    for name, metric in METRICS.items():
        assert metric.meaning and metric.unit and metric.better in ("higher", "lower", "zero", "none"), name


def test_the_page_shows_examples_decisions_and_meanings(real_run: Path, report: Path) -> None:
    page = report.read_text()
    store = Store.open_existing(load_config(real_run / "dreamd.toml", environ={}).store_url)
    data = load_run(store, "ignored", "1")
    store.close()
    assert data.accepted_examples and data.rejected_examples and data.rejections
    assert {e["kind"] for e in data.accepted_examples} >= {"accept", "pushback", "derail", "general"}
    assert all(e["reject_reason"] for e in data.rejected_examples)
    for example in data.rejected_examples:
        assert html.escape(example["reject_reason"]) in page
    assert "q1.<wbr>unclear_<wbr>rate" in page and 'data-metrics="q1.unclear_rate"' in page
    decisions = page.split('id="decisions"')[1].split("</section>")[0]
    assert "{" not in decisions and "settings unchanged" in decisions  # words, not raw JSON
    changed = [d for d in data.decisions if d["before"] != d["after"]]
    assert changed and "learning rate" in decisions and "&rarr;" in decisions


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=120)


def framed(page: Path, width: int, height: int) -> Path:
    """A page holding `page` in an iframe of exactly width x height px (the viewport the report
    sees), so widths under MIN_WINDOW can be rendered."""
    frame = page.with_name(f"frame-{page.stem}-{width}.html")
    frame.write_text(FRAME.format(src=page.name, width=width, height=height))
    return frame


def measure(check_page: Path, width: int) -> dict:
    proc = chromium("--dump-dom", f"--window-size={max(width, MIN_WINDOW)},900",
                    framed(check_page, width, 900).as_uri())
    found = re.search(r'<pre id="dreamd-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium wrote no check result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                    ".ci/run installs it when it can")
def test_the_page_in_a_browser_at_desktop_and_narrow_widths(report: Path, tmp_path: Path, capsys) -> None:
    artefacts = Path(os.environ.get("DREAMD_TEST_ARTEFACTS") or tmp_path) / "report"
    shutil.rmtree(artefacts, ignore_errors=True)
    shutil.copytree(report.parent, artefacts)
    with capsys.disabled():  # shown without -s too
        print(f"\nreport page and screenshots (screenshot-desktop.png, screenshot-narrow.png): {artefacts}")
    check_page = artefacts / "check.html"
    check_page.write_text(report.read_text().replace("</body>", CHECK_JS + "</body>"))
    for name, width in WIDTHS.items():
        got = measure(check_page, width)
        assert got["innerWidth"] == width
        assert got["scrollWidth"] <= width, f"{name}: the page is wider than the window: {got['beyond']}"
        assert len(got["figures"]) >= 20 and all(f["loaded"] and f["right"] <= width for f in got["figures"])
        for fig in got["figures"]:
            assert fig["xlabel"] and fig["ylabel"], fig
            ticks = fig["xticks"].split()
            assert ticks and all(re.fullmatch(r"\d+", t) for t in ticks), f"{fig['metrics']}: ticks {ticks}"
            if fig["metrics"]:
                assert fig["xlabel"] == CYCLE_AXIS
        rows = got["metricRows"]
        assert len(rows) > 30
        for metric, meaning, better, *_ in rows:
            assert meaning and meaning != "(no description)" and better, metric
        shot, height = artefacts / f"screenshot-{name}.png", got["scrollHeight"]
        proc = chromium(f"--screenshot={shot}", f"--window-size={max(width, MIN_WINDOW)},{height}",
                        framed(artefacts / "index.html", width, height).as_uri())
        assert shot.is_file() and shot.read_bytes()[:4] == b"\x89PNG", proc.stderr[-2000:]
        with Image.open(shot) as image:  # the frame only, without the window's spare width
            image.crop((0, 0, width, height)).save(shot)
    for helper in artefacts.glob("*.html"):
        if helper.name != "index.html":
            helper.unlink()
