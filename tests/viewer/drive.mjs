// Drives the OHIF viewer in headless Chromium through one dermpacs study and records what it
// shows: screenshots, segment names, SR texts, console and page errors.
//
//   node tests/viewer/drive.mjs job.json
//
// job.json: {viewerUrl, orthancUrl, orthancStudyId, studyInstanceUID, outDir,
//            series: {photo, seg, sr, overlay} (Series Descriptions), segmentLabels,
//            timeoutMs}
// Writes into outDir: viewer-*.png (pages, for docs/img), raw-*.png (the viewport alone, for
// the pixel checks in tests/test_viewer.py) and result.json. Judging is left to the Python
// test; this script fails only when the viewer cannot be driven (a step times out).

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const out = job.outDir;
fs.mkdirSync(out, { recursive: true });
const timeout = job.timeoutMs ?? 60000;
const started = Date.now();
const result = {
  steps: [],
  consoleErrors: [],
  consoleWarnings: [],
  pageErrors: [],
  failedRequests: [],
  segmentTitles: [],
  srViewportText: '',
  trackedMeasurements: [],
  error: null,
};

function log(message) {
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  result.steps.push({ seconds: Number(seconds), message });
  console.log(`[${seconds} s] ${message}`);
}

// A fresh, empty profile every run (no tour state, no cache, no service worker left over).
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'dermpacs-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: job.chromium ?? '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1400, height: 900 },
  deviceScaleFactor: 1,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(timeout);
page.on('console', (message) => {
  const entry = { type: message.type(), text: message.text().slice(0, 2000) };
  if (message.type() === 'error') result.consoleErrors.push(entry);
  else if (message.type() === 'warning') result.consoleWarnings.push(entry);
});
page.on('pageerror', (error) => result.pageErrors.push(String(error.stack ?? error)));
page.on('requestfailed', (request) =>
  result.failedRequests.push(`${request.url()} ${request.failure()?.errorText ?? ''}`),
);

const viewportPane = page.locator('[data-cy="viewport-pane"]').first();

async function quietMouse() {
  // Hover effects (tool cursors, highlighted rows) must not be in the pictures.
  await page.mouse.move(2, 895);
}

// Screenshot the viewport until two in a row are identical: rendering has finished.
async function settledViewport(name, { settleMs = 20000 } = {}) {
  await quietMouse();
  const end = Date.now() + settleMs;
  let previous = null;
  while (Date.now() < end) {
    const shot = await viewportPane.screenshot({ animations: 'disabled' });
    if (previous && shot.equals(previous)) {
      if (name) fs.writeFileSync(path.join(out, name), shot);
      return shot;
    }
    previous = shot;
    await page.waitForTimeout(400);
  }
  throw new Error(`the viewport did not settle within ${settleMs} ms (${name})`);
}

async function pageShot(name) {
  await quietMouse();
  await page.screenshot({ path: path.join(out, name), animations: 'disabled' });
}

async function openSeries(description) {
  await page
    .locator('[data-cy="studyBrowser-panel"]')
    .getByText(description, { exact: true })
    .dblclick();
}

async function waitForViewportSeries(description) {
  await page
    .locator('[data-cy="viewport-overlay-top-left"]')
    .first()
    .getByText(description, { exact: true })
    .waitFor();
}

async function segmentRow(label) {
  return page.locator('[data-cy="data-row"]:visible').filter({
    has: page.locator('[data-cy="data-row-title"]', { hasText: new RegExp(`^${label}$`) }),
  });
}

try {
  // --- the photo --------------------------------------------------------------------------
  await page.goto(`${job.viewerUrl}/viewer?StudyInstanceUIDs=${job.studyInstanceUID}`);
  log('viewer page loaded');
  // The first-visit tour dims the page and catches clicks.
  await page.getByText('Skip all', { exact: true }).click();
  log('tour dismissed');
  await waitForViewportSeries(job.series.photo);
  await settledViewport('raw-photo.png');
  result.viewport = await viewportPane.boundingBox();
  await pageShot('viewer-photo.png');
  log('photo shown');

  // --- the SEG ----------------------------------------------------------------------------
  await openSeries(job.series.seg);
  await page.locator('[data-cy="yes-hydrate-btn"]').click();
  log('SEG hydrated');
  const segmentsPanel = page.locator('[data-cy="data-row-title"]:visible');
  if ((await segmentsPanel.count()) === 0) {
    await page.locator('[data-cy="panelSegmentation-btn"]').click();
  }
  for (const label of job.segmentLabels) {
    await segmentsPanel.filter({ hasText: new RegExp(`^${label}$`) }).waitFor();
  }
  result.segmentTitles = await segmentsPanel.allInnerTexts();
  log(`segments in the panel: ${result.segmentTitles.join(', ')}`);
  await settledViewport('raw-seg-all.png');
  await pageShot('viewer-seg.png');
  // One segment at a time, then none: the differences are what each segment draws.
  const [first, ...others] = job.segmentLabels;
  await (await segmentRow(first)).locator('[data-cy="data-row-visibility-toggle"]').click();
  await settledViewport(`raw-seg-only-${others.join('-').toLowerCase()}.png`);
  for (const label of others) {
    await (await segmentRow(label)).locator('[data-cy="data-row-visibility-toggle"]').click();
  }
  await settledViewport('raw-seg-none.png');
  for (const label of job.segmentLabels) {
    await (await segmentRow(label)).locator('[data-cy="data-row-visibility-toggle"]').click();
  }
  await settledViewport(null);
  log('segment visibility toggled');

  // --- the SR -----------------------------------------------------------------------------
  await openSeries(job.series.sr);
  // OHIF shows the SR read-only (regions and the report's values) and asks whether to track
  // (hydrate) its measurements; the question stays on top until answered.
  await page.locator('[data-cy="yes-hydrate-btn"]').waitFor();
  await page.locator('[data-cy="viewport-pane"] svg text').first().waitFor();
  await settledViewport('raw-sr.png');
  result.srViewportText = await viewportPane.innerText();
  await pageShot('viewer-sr.png');
  log('SR shown read-only');
  // Tracking: the SR's regions become editable measurements in the measurements panel.
  await page.locator('[data-cy="yes-hydrate-btn"]').click();
  await page.locator('[data-cy="trackedMeasurements-btn"]').click();
  const measurementRows = page.locator('[data-cy="data-row-title"]:visible');
  await measurementRows.first().waitFor();
  await settledViewport(null);
  result.trackedMeasurements = await measurementRows.allInnerTexts();
  await pageShot('viewer-sr-tracked.png');
  log(`SR tracked: ${result.trackedMeasurements.join(', ')}`);

  // --- the overlay Secondary Capture ------------------------------------------------------
  await openSeries(job.series.overlay);
  await waitForViewportSeries(job.series.overlay);
  await settledViewport('raw-overlay.png');
  await pageShot('viewer-overlay.png');
  log('overlay shown');

  // --- Orthanc's own web interface --------------------------------------------------------
  if (job.orthancUrl && job.orthancStudyId) {
    await page.goto(`${job.orthancUrl}/app/explorer.html#study?uuid=${job.orthancStudyId}`);
    await page.getByText(job.series.overlay, { exact: false }).first().waitFor();
    await page.waitForTimeout(500);
    await pageShot('viewer-orthanc.png');
    log('Orthanc Explorer shown');
  }
} catch (error) {
  result.error = String(error.stack ?? error);
  log(`failed: ${String(error.message ?? error).split('\n')[0]}`);
  try {
    await page.screenshot({ path: path.join(out, 'failure.png') });
    result.failureText = (await page.locator('body').innerText()).slice(0, 4000);
  } catch {
    // the page is gone; the error says why
  }
} finally {
  result.seconds = (Date.now() - started) / 1000;
  fs.writeFileSync(path.join(out, 'result.json'), JSON.stringify(result, null, 2));
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.exit(result.error ? 1 : 0);
