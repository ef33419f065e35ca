"""The reports of a tiny end-to-end run, opened in a real browser (headless Chromium, served over
localhost): every image and video on the pages loads, every video plays, videos are shown at a size a
person can see, and each subject's page starts with its summary."""

import functools
import http.server
import threading

import pytest

PAGES = ["index.html", "m030/report/index.html", "d18/report/index.html", "m030/qa/report.html"]


@pytest.fixture(scope="module")
def served_results(workspace):
    """The workspace's results folder on an HTTP server at 127.0.0.1 (as a person's browser would load it)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(workspace / "results"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# every <video> on the page: start it, let it run, and report what the browser saw
VIDEO_CHECK = """async () => {
  const seen = [];
  for (const v of document.querySelectorAll('video')) {
    v.muted = true;
    v.loop = false;  // a 4-frame clip loops back to 0 every 0.16 s; played once, it stops at its end
    v.currentTime = 0;
    let played = null;
    const timeout = new Promise((_, reject) => setTimeout(() => reject('did not start within 5 s'), 5000));
    try { await Promise.race([v.play(), timeout]); } catch (e) { played = String(e); }
    await new Promise(r => setTimeout(r, 800));
    seen.push({src: v.currentSrc, error: v.error ? v.error.code : null, played: played,
               advanced: v.currentTime > 0 || v.ended, frames: v.getVideoPlaybackQuality().totalVideoFrames,
               width: v.videoWidth, shown: v.clientWidth});
    v.pause();
  }
  return seen;
}"""


@pytest.mark.e2e
@pytest.mark.parametrize("page_path", PAGES)
def test_every_image_and_video_of_the_report_loads_and_plays(browser, served_results, page_path, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    failed = []
    page.on("requestfailed", lambda request: failed.append(f"{request.url}: {request.failure}"))
    page.on("response", lambda response: response.status >= 400 and failed.append(f"{response.url}: {response.status}"))
    page.goto(f"{served_results}/{page_path}", wait_until="networkidle")
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({src: e.src, ok: e.complete && e.naturalWidth > 0}))"
    )
    assert all(image["ok"] for image in images), [image["src"] for image in images if not image["ok"]]
    links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    for link in links:  # every link on the page leads somewhere
        assert page.request.get(link).ok, link
    videos = page.evaluate(VIDEO_CHECK)
    for video in videos:
        assert video["error"] is None and video["played"] is None, video
        assert video["advanced"] and video["frames"] > 0 and video["width"] > 0, f"did not play: {video}"
        assert video["shown"] >= 384, f"shown at {video['shown']} px: {video}"
    assert not failed, failed
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if page_path.endswith("report/index.html"):
        assert images and videos  # a subject page has the contact sheet, curves and videos
        first_heading = page.eval_on_selector("h2", "e => e.textContent")
        assert first_heading == "Summary"
        summary = page.inner_text(".summary")
        assert "Preprocessing:" in summary and "Tracking: ict model" in summary
        assert "tiny" in summary and "PSNR" in summary  # the avatar's headline metrics
    page.close()
