"""The inspector page in headless Chromium against a real `dare-serve serve` process.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped without them.
The page is driven like a user would: pick a user, type candidates, score, click a row. What it
shows is compared with what the API answers for the same request. A screenshot is kept at
`artifacts/inspector.png`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from service.process import ServeProcess
from service.routes.inspector import EXAMPLE_USERS
from tests.conftest import TinyModels, read_events

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    pytest.skip("needs selenium (the dev extra)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "inspector.png"
WAIT_S = 30


@dataclass(frozen=True)
class Server:
    base: str
    events: pd.DataFrame  # the dataset the server loaded at start-up (in-memory store)


@pytest.fixture(scope="module")
def server(
    tiny_models: TinyModels, tiny_fm_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """`dare-serve serve` with the in-memory store filled from the tiny dataset and FM embeddings."""
    log = tmp_path_factory.mktemp("inspector") / "serve.log"
    args = ["--data", str(tiny_models.data), "--fm-embeddings", str(tiny_fm_file)]
    with ServeProcess(tiny_models.root, args=args, log=log, ready_timeout=60) as proc:
        yield Server(proc.base, read_events(tiny_models.data))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: Chromium refuses to run as root with its sandbox; /dev/shm is small in containers.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Any) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d))
    except TimeoutException:
        status = driver.find_elements(By.ID, "status")
        raise AssertionError(f"page status: {status[0].text if status else '(no page)'}") from None


# Everything the page shows, read in one round trip.
READ_PAGE = """
const rows = (sel) => [...document.querySelectorAll(sel)];
return {
  asOf: Number(document.getElementById("results").dataset.asOf),
  rankings: rows("#rankings .ranking").map((card) => ({
    variant: card.dataset.variant,
    version: card.dataset.version,
    rows: rows(`#rankings .ranking[data-variant="${card.dataset.variant}"] tr.rank-row`).map((tr) => ({
      index: Number(tr.dataset.index), item: tr.dataset.item, score: tr.dataset.score,
      shown: tr.querySelector("td.score").textContent, rank: Number(tr.dataset.rank),
      selected: tr.classList.contains("selected"),
    })),
  })),
  explain: rows("#explain details.candidate").map((d) => ({
    item: d.dataset.item,
    open: d.open,
    variants: Object.fromEntries([...d.querySelectorAll(".explain-variant")].map((box) => [
      box.dataset.variant,
      [...box.querySelectorAll("tr.behavior")].map((tr) => [
        Number(tr.dataset.item), Number(tr.dataset.timestamp), tr.dataset.attention]),
    ])),
    effective: Object.fromEntries([...d.querySelectorAll(".explain-variant")].map((box) => [
      box.dataset.variant, box.dataset.effective])),
  })),
  ticks: rows("#timeline line.event").length,
  candidateTicks: rows("#timeline line.event.candidate-item").length,
  circles: Object.fromEntries(rows("#timeline g.lane").map((g) => [
    g.dataset.variant, [...g.querySelectorAll("circle.retrieved")].map((c) => Number(c.dataset.item))])),
};
"""


def _type(driver: Any, element_id: str, text: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def test_inspector_shows_what_the_api_answers(server: Server, browser: Any) -> None:
    events = server.events.sort_values(["user_id", "timestamp"], kind="stable")
    counts = events["user_id"].value_counts()
    models = {m["variant"]: m for m in httpx.get(server.base + "/v1/models").json()["variants"]}
    assert set(models) == {"dare", "coupled"}

    browser.get(server.base + "/")
    chips = _wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#example-user-list button.chip") or None
    )
    assert len(chips) == EXAMPLE_USERS
    assert [c.get_attribute("data-user") for c in chips][0] == counts.idxmax()  # longest history first

    # "Suggest candidates" through a chip: the user's newest distinct items come first.
    second = chips[1].get_attribute("data-user")
    chips[1].click()
    _wait(browser, lambda d: d.find_element(By.ID, "candidates").get_attribute("value") or None)
    suggested = browser.find_element(By.ID, "candidates").get_attribute("value").split(", ")
    history = events[events["user_id"] == second]["item_id"].tolist()
    newest = list(dict.fromkeys(reversed(history)))[:4]
    assert len(suggested) == 8 and suggested[:4] == [str(i) for i in newest]

    # Now as a user types it: a user with a long history, three items they had, three they did
    # not, and one id no model knows.
    user = counts.index[1]
    own = list(dict.fromkeys(reversed(events[events["user_id"] == user]["item_id"].tolist())))[:3]
    others = sorted(set(events["item_id"].tolist()) - set(own))[:3]
    candidates = [*own, *others, int(events["item_id"].max()) + 10_000]
    _type(browser, "user-id", user)
    _type(browser, "candidates", ", ".join(map(str, candidates)))
    browser.find_element(By.ID, "score").click()

    def scored(d: Any) -> bool:
        cards = d.find_elements(By.CSS_SELECTOR, "#rankings .ranking")
        rows = d.find_elements(By.CSS_SELECTOR, "#rankings tr.rank-row")
        return len(cards) == 2 and len(rows) == 2 * len(candidates)

    _wait(browser, scored)
    shown = browser.execute_script(READ_PAGE)

    # The same request to the API, at the same reference time the page used.
    body = {"user_id": user, "candidates": candidates, "explain": True, "timestamp": shown["asOf"]}
    answers = {
        v: httpx.post(server.base + "/v1/score", json=body, headers={"X-Experiment": v}).json()
        for v in models
    }
    assert [r["variant"] for r in shown["rankings"]] == ["coupled", "dare"]  # as /v1/models lists them
    for ranking in shown["rankings"]:
        answer = answers[ranking["variant"]]
        assert ranking["version"] == answer["model_version"]
        rows = ranking["rows"]
        assert sorted(r["index"] for r in rows) == list(range(len(candidates)))
        assert [r["rank"] for r in rows] == list(range(1, len(candidates) + 1))
        for r in rows:
            score = answer["scores"][r["index"]]
            assert float(r["score"]) == score and r["shown"] == f"{score:.4f}"
            assert r["item"] == str(candidates[r["index"]])
        scores = [float(r["score"]) for r in rows]
        assert scores == sorted(scores, reverse=True)
        assert answer["unknown_items"] == 1 and answer["user"]["fm_embedding"] == "hit"

    # Per candidate, the retrieved behaviors of each variant, exactly as explain returns them.
    assert [e["item"] for e in shown["explain"]] == [str(c) for c in candidates]
    for c, entry in enumerate(shown["explain"]):
        for variant, answer in answers.items():
            expected = [
                (b["item_id"], b["timestamp"], b["attention"]) for b in answer["explain"][c]["behaviors"]
            ]
            got = [(i, t, float(a)) for i, t, a in entry["variants"][variant]]
            assert got == expected and len(got) == models[variant]["top_k"]
            assert float(entry["effective"][variant]) == answer["explain"][c]["effective_behaviors"]

    # The timeline: every behavior a model reads, and candidate 0's retrieved ones (selected first).
    window = min(10_000, max(m["search_depth"] for m in models.values()))
    sequence = httpx.get(f"{server.base}/v1/users/{user}/sequence", params={"limit": window}).json()
    assert shown["ticks"] == len(sequence["events"]) == min(window, counts[user])
    assert shown["candidateTicks"] == sum(e["item_id"] == candidates[0] for e in sequence["events"]) > 0
    for variant, answer in answers.items():
        retrieved = sorted(b["item_id"] for b in answer["explain"][0]["behaviors"])
        assert sorted(shown["circles"][variant]) == retrieved

    # Clicking dare's top row selects that candidate everywhere.
    top = next(r for r in shown["rankings"] if r["variant"] == "dare")["rows"][0]
    browser.find_element(By.CSS_SELECTOR, '#rankings .ranking[data-variant="dare"] tr.rank-row').click()
    _wait(browser, lambda d: d.execute_script(READ_PAGE)["explain"][top["index"]]["open"])
    after = browser.execute_script(READ_PAGE)
    assert all(r["selected"] == (r["index"] == top["index"]) for k in after["rankings"] for r in k["rows"])
    for variant, answer in answers.items():
        retrieved = sorted(b["item_id"] for b in answer["explain"][top["index"]]["behaviors"])
        assert sorted(after["circles"][variant]) == retrieved

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors

    SCREENSHOT.parent.mkdir(exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(int(height) + 40, 6000))
    # The whole page from the top, without the click's scroll or the pointer's hover highlight.
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    browser.execute_script("window.scrollTo({top: 0, behavior: 'instant'})")
    _wait(browser, lambda d: d.execute_script("return window.scrollY") == 0)
    assert browser.save_screenshot(str(SCREENSHOT))
    print(f"inspector screenshot: {SCREENSHOT}")


def test_a_link_scores_a_cold_start_user(server: Server, browser: Any) -> None:
    """`/?user=...&candidates=...` (the URL a scored page shows) scores at once; no history is no error."""
    browser.get(server.base + "/?user=nobody-yet&candidates=3,5")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rankings tr.rank-row")) == 4)
    shown = browser.execute_script(READ_PAGE)
    for ranking in shown["rankings"]:
        answer = httpx.post(
            server.base + "/v1/score",
            json={"user_id": "nobody-yet", "candidates": [3, 5], "timestamp": shown["asOf"]},
            headers={"X-Experiment": ranking["variant"]},
        ).json()
        assert answer["user"]["cold_start"]
        assert sorted(float(r["score"]) for r in ranking["rows"]) == sorted(answer["scores"])
    assert [e["item"] for e in shown["explain"]] == ["3", "5"]
    assert all(v == [] for e in shown["explain"] for v in e["variants"].values())
    assert shown["ticks"] == 0
    assert "cold-start" in browser.find_element(By.ID, "timeline").text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_swagger_ui_renders_offline(server: Server, browser: Any) -> None:
    """/docs draws every operation with the vendored Swagger UI, without a console error."""
    browser.get(server.base + "/docs")
    paths = _wait(
        browser,
        lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")] or None,
    )
    spec = httpx.get(server.base + "/openapi.json").json()
    assert {p.replace("\u200b", "") for p in paths} == set(spec["paths"])
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
