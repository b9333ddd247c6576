"""The W2SD panel in A1111's Gradio UI, in a real browser (headless Chromium through Selenium).

Skipped without ``SDWEBUI_PATH`` (an A1111 checkout, as for ``test_sd_webui_live.py``), without Selenium in the
Python running the tests, or without Debian's ``chromium`` and ``chromium-driver`` (``W2SD_CHROMIUM`` /
``W2SD_CHROMEDRIVER`` name other binaries). Nothing is downloaded: Selenium is given the driver's path. The
screenshots land in the test's output folder (pytest's tmp path, printed; kept by pytest for the last runs).
"""
import os
import shutil
import tempfile
import time

import pytest

import sdwebui_server

ROOT = os.environ.get('SDWEBUI_PATH')
pytestmark = pytest.mark.skipif(not ROOT, reason='SDWEBUI_PATH (an A1111 checkout) is not set')
webdriver = pytest.importorskip('selenium.webdriver')
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = os.environ.get('W2SD_CHROMIUM', shutil.which('chromium') or '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('W2SD_CHROMEDRIVER', shutil.which('chromedriver') or '/usr/bin/chromedriver')
ID = 'script_txt2img_w2sd_'  # the elem_id prefix of the panel's controls on the txt2img tab

GOOD = ('a red cube\nNegative prompt: blurry\nSteps: 8, Sampler: W2SD Euler, CFG scale: 5.5, Seed: 1, Size: 64x64, '
        'W2SD: prompt, W2SD weak prompt: a cube, W2SD reflection CFG: 2.0, W2SD lambda: 7, W2SD strength: 0.5, '
        'W2SD weak sigma: next')
BAD = ('a red cube\nSteps: 8, Sampler: W2SD Euler, CFG scale: 5.5, Seed: 1, Size: 64x64, W2SD: cfg, '
       'W2SD weak CFG: 1.0, W2SD lambda: 2.7')


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    if os.path.isdir(os.path.join(ROOT, 'modules_forge')):
        pytest.skip('SDWEBUI_PATH is Forge; this test reads A1111\'s Gradio 3 page')
    if not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)):
        pytest.skip('no chromium / chromedriver (apt-get install chromium chromium-driver)')
    server = sdwebui_server.Server(ROOT, tmp_path_factory.mktemp('sdwebui_ui'), ui=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix='w2sd-chromium-')
    for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 f'--user-data-dir={profile}', '--window-size=1400,2400'):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get(server.url)
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f'#{ID}enabled input[type=checkbox]'), 300)
        yield driver
    finally:
        driver.quit()
        server.stop()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(f'{condition} did not hold in {timeout} s')


def panel(driver):
    """The panel's state as the page shows it."""
    def checked(name):
        return [e.get_attribute('value') for e in driver.find_elements(By.CSS_SELECTOR, f'#{ID}{name} input')
                if e.is_selected()]

    return {
        'enabled': driver.find_element(By.CSS_SELECTOR, f'#{ID}enabled input[type=checkbox]').is_selected(),
        'weak': checked('weak'),
        'weak_choices': [e.get_attribute('value') for e in
                         driver.find_elements(By.CSS_SELECTOR, f'#{ID}weak input[type=radio]')],
        'weak_prompt': driver.find_element(By.CSS_SELECTOR, f'#{ID}weak_prompt textarea').get_attribute('value'),
        'lam': driver.find_element(By.CSS_SELECTOR, f'#{ID}lam input[type=number]').get_attribute('value'),
        'strength': driver.find_element(By.CSS_SELECTOR, f'#{ID}strength input[type=number]').get_attribute('value'),
        'weak_sigma': checked('weak_sigma'),
        'checkpoint_shown': any(e.is_displayed() for e in driver.find_elements(By.ID, f'{ID}weak_checkpoint')),
        'message': driver.find_element(By.ID, f'{ID}message').text,
    }


def paste(driver, text):
    """Type an infotext into the txt2img prompt and press the paste button, as a user does."""
    prompt = driver.find_element(By.CSS_SELECTOR, '#txt2img_prompt textarea')
    prompt.clear()
    prompt.send_keys(text)
    button = next(b for b in driver.find_elements(By.ID, 'paste') if b.is_displayed())
    button.click()


def test_the_panel_renders_with_a1111s_weak_models(browser, tmp_path):
    title = browser.find_elements(By.XPATH, "//*[contains(text(), 'W2SD: Weak-to-Strong Diffusion')]")
    next(e for e in title if e.is_displayed()).click()  # the txt2img tab's accordion
    state = wait_for(lambda: (s := panel(browser))['weak_choices'] and s)
    assert state['weak_choices'] == ['cfg', 'prompt', 'lora']  # no checkpoint kind on A1111
    assert not state['checkpoint_shown'] and not state['enabled'] and state['message'] == ''
    browser.save_screenshot(str(tmp_path / 'w2sd_panel.png'))
    print('screenshot:', tmp_path / 'w2sd_panel.png')


def test_pasting_a_good_infotext_fills_the_panel(browser, tmp_path):
    paste(browser, GOOD)
    state = wait_for(lambda: (s := panel(browser))['enabled'] and s['lam'] == '7' and s)
    assert state['weak'] == ['prompt'] and state['weak_prompt'] == 'a cube' and float(state['strength']) == 0.5
    assert state['weak_sigma'] == ['next'] and state['message'] == ''
    browser.save_screenshot(str(tmp_path / 'w2sd_paste_good.png'))
    print('screenshot:', tmp_path / 'w2sd_paste_good.png')


def test_pasting_an_invalid_infotext_switches_w2sd_off_and_says_why(browser, tmp_path):
    paste(browser, GOOD)
    wait_for(lambda: panel(browser)['enabled'])
    paste(browser, BAD)
    state = wait_for(lambda: (s := panel(browser))['message'] and s)
    assert "W2SD: the pasted infotext was not applied to the W2SD panel (infotext W2SD lambda: '2.7' is not a " \
           "whole number); W2SD is off, its settings at their defaults" == state['message']
    # not the earlier paste's settings: the defaults, W2SD off
    assert not state['enabled'] and state['weak'] == ['cfg'] and state['lam'] == '-1' and state['weak_prompt'] == ''
    browser.save_screenshot(str(tmp_path / 'w2sd_paste_bad.png'))
    print('screenshot:', tmp_path / 'w2sd_paste_bad.png')
    paste(browser, GOOD)  # a good paste clears the message
    wait_for(lambda: (s := panel(browser))['enabled'] and s['message'] == '')
