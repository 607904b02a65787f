// Drives the dermpacs admin page in headless Chromium, as an admin would:
// is refused without credentials, signs in, finds the job the test sent, retries it from the
// failed list, watches it get delivered, C-ECHOes the PACS, and reads the configuration.
// Screenshots go to OUT_DIR; a JSON summary of what it saw goes to standard output.
//
// Environment: BASE_URL, ADMIN_USER, ADMIN_PASSWORD, JOB_ID, DESTINATION, OUT_DIR,
// NODE_MODULES (where playwright-core is installed), CHROMIUM (default /usr/bin/chromium).
'use strict';

const path = require('node:path');
const { chromium } = require(path.join(process.env.NODE_MODULES, 'playwright-core'));

const BASE_URL = process.env.BASE_URL;
const JOB_ID = process.env.JOB_ID;
const DESTINATION = process.env.DESTINATION;
const OUT_DIR = process.env.OUT_DIR;
const VIEWPORT = { width: 1360, height: 860 };

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(OUT_DIR, `admin-${name}.png`), fullPage: false });
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  const summary = {};
  try {
    // 1. Without credentials: 401 and a sign-in challenge. (A page navigation would stop at
    // the browser's sign-in prompt, which headless Chromium cannot show; ask with the
    // context's own request client, which keeps the browser's cookies and headers.)
    const anonymous = await browser.newContext({ viewport: VIEWPORT });
    const refused = await anonymous.request.get(`${BASE_URL}/`);
    summary.anonymousStatus = refused.status();
    summary.challenge = refused.headers()['www-authenticate'] || '';
    await anonymous.close();

    // 2. Signed in (HTTP basic): the overview lists the job as failed.
    const context = await browser.newContext({
      viewport: VIEWPORT,
      httpCredentials: { username: process.env.ADMIN_USER, password: process.env.ADMIN_PASSWORD },
    });
    const page = await context.newPage();
    const overview = await page.goto(`${BASE_URL}/`);
    summary.overviewStatus = overview.status();
    const row = page.locator(`tr.job-row[data-job="${JOB_ID}"]`);
    await row.waitFor();
    summary.overviewJobState = (await row.locator('.state').innerText()).trim();
    summary.listener = (await page.locator('#listener .big').innerText()).trim();
    summary.signedInAs = (await page.locator('.who').innerText()).trim();
    await shot(page, 'overview');

    // 3. The failed list: the reason, then Retry.
    await page.goto(`${BASE_URL}/jobs?state=failed`);
    const failedRow = page.locator(`tr.job-row[data-job="${JOB_ID}"]`);
    summary.failedReason = (await failedRow.locator('td.reason').innerText()).trim();
    await shot(page, 'failed');
    await Promise.all([
      page.waitForURL(new RegExp(`/jobs/${JOB_ID}\\?notice=`)),
      failedRow.locator('button.retry').click(),
    ]);
    summary.notice = (await page.locator('#notice').innerText()).trim();
    summary.afterRetryUrl = page.url().replace(BASE_URL, '');

    // 4. The job page, reloaded until the retried delivery is acknowledged.
    const deadline = Date.now() + 90_000;
    for (;;) {
      summary.finalState = (await page.locator('h1 .state').innerText()).trim();
      if (summary.finalState === 'delivered' || Date.now() > deadline) break;
      await page.waitForTimeout(1000);
      await page.goto(`${BASE_URL}/jobs/${JOB_ID}`);
    }
    const overlay = page.locator('img#overlay');
    await overlay.waitFor();
    await page.waitForFunction(() => {
      const img = document.querySelector('img#overlay');
      return img && img.complete && img.naturalWidth > 0;
    });
    summary.overlaySize = await overlay.evaluate((img) => [img.naturalWidth, img.naturalHeight]);
    summary.audit = await page.locator('#audit tbody tr').evaluateAll((rows) =>
      rows.map((r) => Array.from(r.querySelectorAll('td')).map((td) => td.innerText.trim())));
    await shot(page, 'job');

    // 5. Destinations: C-ECHO the PACS.
    await page.goto(`${BASE_URL}/destinations`);
    const destinationRow = page.locator('#destinations tbody tr', { hasText: DESTINATION });
    await Promise.all([
      page.waitForURL(`${BASE_URL}/destinations/${DESTINATION}/test`),
      destinationRow.locator('button.test').click(),
    ]);
    summary.echo = (await page.locator('#check-result').innerText()).trim();
    await shot(page, 'destinations');

    // 6. The effective configuration, secrets masked.
    await page.goto(`${BASE_URL}/config`);
    summary.config = await page.locator('#config').innerText();
    await shot(page, 'config');
    await context.close();
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(summary) + '\n');
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
