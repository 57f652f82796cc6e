"""`engram-local serve` on the real default model (slow): memory written through POST
/v1/memories is recalled through the openai client by its user only, and forgotten through
DELETE; the chat page driven in headless Chromium (Debian's `chromium` + `chromium-driver`, via
selenium): load, chat with a streamed reply, add a fact, see it listed, ask about it, forget it.

    python -m pytest -q -m slow tests/test_serve_default_model.py
"""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from engram_local.runtime import loader  # noqa: E402
from tests.test_serve import KEY, call, running_server, wait_job  # noqa: E402

pytestmark = pytest.mark.slow

DEFAULT = loader.default_model_dir()       # resolved before any fixture moves ENGRAM_LOCAL_HOME


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    if not (DEFAULT / "engram.gguf").exists():
        pytest.skip(f"the default model is not built at {DEFAULT} (run `engram-local inspect` once)")
    with running_server(DEFAULT, tmp_path_factory.mktemp("serve-default"), n_parallel=4, ctx=4096,
                        preload_writer=True) as (base, state):
        yield base, state


def _ask(client, user, question="Who is my doctor?"):
    r = client.chat.completions.create(model="default", user=user, max_tokens=24, temperature=0,
                                       messages=[{"role": "user", "content": question}])
    return r.choices[0].message.content


def test_memory_written_through_the_api_is_recalled_then_forgotten(live):
    base, _ = live
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    doctors = {"ada": "Dr. Krause", "bo": "Dr. Okonkwo"}
    jobs = [call(base, "POST", "/v1/memories", {"user": u, "statement": f"My doctor is {d}."})[1]["id"]
            for u, d in doctors.items()]
    assert all(wait_job(base, j)["status"] == "done" for j in jobs)
    for u, d in doctors.items():
        answer = _ask(client, u)
        assert d.split()[-1] in answer, (u, answer)
        assert not any(o.split()[-1] in answer for v, o in doctors.items() if v != u), (u, answer)
    assert "Krause" not in _ask(client, None) and "Krause" not in _ask(client, "stranger")
    (fact,) = call(base, "GET", "/v1/memories?user=ada")[1]["facts"]
    assert (fact["prompt"], fact["answer"]) == ("My doctor is", "Dr. Krause")
    st, job = call(base, "DELETE", f"/v1/memories/ada/{fact['id']}")
    assert st == 202 and wait_job(base, job["id"])["status"] == "done"
    assert "Krause" not in _ask(client, "ada")
    assert "Okonkwo" in _ask(client, "bo")


def test_a_paraphrased_question_is_routed_to_the_fact_over_http(live):
    """The reply opens with the words the user's rows were fitted after, as `run` opens it
    (runtime.routing), streamed and counted as completion tokens."""
    base, _ = live
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    job = call(base, "POST", "/v1/memories", {"user": "cy", "statement": "I drive a red Volvo."})[1]["id"]
    assert wait_job(base, job)["status"] == "done"
    r = client.chat.completions.create(model="default", user="cy", max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": "What vehicle do I own?"}])
    text = r.choices[0].message.content
    assert "Volvo" in text, text
    assert r.usage.completion_tokens >= 4          # the opening's tokens count as the reply's
    chunks = client.chat.completions.create(model="default", user="cy", max_tokens=16, temperature=0,
                                            stream=True,
                                            messages=[{"role": "user", "content": "What vehicle do I own?"}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    general = _ask(client, "cy", "What is the capital of France?")
    assert "Paris" in general, general


def _browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=opts, service=service)


def _until(fn, timeout=180, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_page_in_a_headless_browser(live):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, _ = live
    driver = _browser()
    try:
        driver.get(base + "/")
        assert driver.title == "engram-local"
        key, user = driver.find_element(By.ID, "key"), driver.find_element(By.ID, "user")
        key.send_keys(KEY, Keys.TAB)
        user.send_keys("carla", Keys.TAB)
        _until(lambda: "nothing remembered" in driver.find_element(By.ID, "facts").text, 30, "an empty fact list")

        def send(text):
            before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
            box = driver.find_element(By.ID, "msg")
            box.send_keys(text, Keys.ENTER)
            bubble = _until(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[before:], 30,
                            "a reply bubble")[0]
            partial = _until(lambda: bubble.text, 120, "streamed text")     # text shows before the end
            _until(lambda: bubble.get_attribute("data-done") == "1", 180, "the end of the reply")
            return partial, bubble.text

        partial, whole = send("Hello! Say something nice.")
        assert whole and whole.startswith(partial[:1])
        # add a fact in the side panel, see it listed, ask about it
        st = driver.find_element(By.ID, "statement")
        st.send_keys("My doctor is Dr. Varga.", Keys.ENTER)
        _until(lambda: "Dr. Varga" in driver.find_element(By.ID, "facts").text, 300, "the fact listed")
        driver.find_element(By.ID, "clear").click()
        _, answer = send("Who is my doctor?")
        assert "Varga" in answer, answer
        # forget it
        driver.find_element(By.CSS_SELECTOR, "#facts button.forget").click()
        _until(lambda: "nothing remembered" in driver.find_element(By.ID, "facts").text, 300, "the fact gone")
        driver.find_element(By.ID, "clear").click()
        _, answer = send("Who is my doctor?")
        assert "Varga" not in answer, answer
    finally:
        driver.quit()
