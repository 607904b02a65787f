// Drives the OHIF viewer in headless Chromium through one dermpacs study and records what it
// shows: screenshots, segment names, SR texts, console and page errors.
//
//   node tests/viewer/drive.mjs job.json
//
// job.json: {viewerUrl, orthancUrl, orthancStudyId, studyInstanceUID, outDir,
//            series: {photo, seg, sr, overlay} (Series Descriptions),
//            instances: {photo, overlay} (SOP Instance UIDs), segments: [{label, pixels}],
//            timeoutMs}
// Order: photo, overlay, SEG (all, one segment, none), SR (read-only, then tracked), Orthanc
// Explorer. Writes into outDir: viewer-*.png (pages, for docs/img), raw-*.png (the viewport
// alone, for the pixel checks in tests/test_viewer.py) and result.json. Judging is left to the
// Python test; this script fails only when the viewer cannot be driven (a step times out).

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
  retries: [],
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
// Requests still open when a step times out say where the viewer is waiting.
const pending = new Map();
page.on('request', (request) => pending.set(request, Date.now()));
page.on('requestfinished', (request) => pending.delete(request));
page.on('requestfailed', (request) => {
  pending.delete(request);
  result.failedRequests.push(`${request.url()} ${request.failure()?.errorText ?? ''}`);
});

function pendingUrls() {
  return [...pending].map(([request, since]) => `${request.url()} (${Date.now() - since} ms)`);
}

const viewportPane = page.locator('[data-cy="viewport-pane"]').first();

async function quietMouse() {
  // Hover effects (tool cursors, highlighted rows) must not be in the pictures.
  await page.mouse.move(2, 895);
}

// Screenshot the viewport until three in a row (a second apart in all) are identical:
// rendering has finished. With `changedFrom`, the picture must first differ from that one (a
// click whose effect is not drawn yet must not pass for a settled picture).
async function settledViewport(name, { changedFrom = null, settleMs = 30000 } = {}) {
  await quietMouse();
  const end = Date.now() + settleMs;
  let previous = null;
  let same = 0;
  while (Date.now() < end) {
    const shot = await viewportPane.screenshot({ animations: 'disabled' });
    if (changedFrom && shot.equals(changedFrom)) {
      await page.waitForTimeout(200);
      continue;
    }
    same = previous && shot.equals(previous) ? same + 1 : 0;
    if (same === 2) {
      if (name) fs.writeFileSync(path.join(out, name), shot);
      return shot;
    }
    previous = shot;
    await page.waitForTimeout(500);
  }
  const waiting = changedFrom && previous === null ? 'did not change' : 'did not settle';
  throw new Error(`the viewport ${waiting} within ${settleMs} ms (${name})`);
}

// Wait until cornerstone has the instance's image in the viewport (its imageId names the
// SOP Instance UID); drawing follows in the next frames, which settledViewport waits for.
async function waitForImage(sopInstanceUID) {
  await page.waitForFunction(
    (uid) =>
      (window.cornerstone?.getEnabledElements?.() ?? []).some((enabled) => {
        const viewport = enabled.viewport;
        return (
          (viewport?.getCurrentImageId?.() ?? '').includes(uid) && viewport.getImageData?.()
        );
      }),
    sopInstanceUID,
  );
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

function segmentRow(label) {
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
  await waitForImage(job.instances.photo);
  await settledViewport('raw-photo.png');
  result.viewport = await viewportPane.boundingBox();
  await pageShot('viewer-photo.png');
  log('photo shown');

  // --- the overlay Secondary Capture (before the SEG and SR fill the side panels) ----------
  await openSeries(job.series.overlay);
  await waitForViewportSeries(job.series.overlay);
  await waitForImage(job.instances.overlay);
  // OHIF opens its cine player over OT images (autoCineModalities); it would hide part of the
  // picture and stay on top for the rest of the run.
  const cineClose = page.locator('[data-cy="cine-player-close"]');
  await cineClose.waitFor({ timeout: 5000 }).catch(() => {});
  if (await cineClose.isVisible()) await cineClose.click();
  await settledViewport('raw-overlay.png');
  await pageShot('viewer-overlay.png');
  log('overlay shown');

  // --- the SEG ----------------------------------------------------------------------------
  await openSeries(job.series.seg);
  await page.locator('[data-cy="yes-hydrate-btn"]').click();
  log('SEG hydrated');
  const segmentsPanel = page.locator('[data-cy="data-row-title"]:visible');
  if ((await segmentsPanel.count()) === 0) {
    await page.locator('[data-cy="panelSegmentation-btn"]').click();
  }
  for (const { label } of job.segments) {
    await segmentsPanel.filter({ hasText: new RegExp(`^${label}$`) }).waitFor();
  }
  result.segmentTitles = await segmentsPanel.allInnerTexts();
  log(`segments in the panel: ${result.segmentTitles.join(', ')}`);
  // The segmentation panel narrows the viewport; on a loaded machine OHIF has been seen to keep
  // the old canvas squeezed into the new width (the photo drawn out of proportion, and every
  // screenshot after it alike). A change of window size makes it fit the image again.
  await page.setViewportSize({ width: 1400, height: 899 });
  await page.waitForTimeout(500);
  await page.setViewportSize({ width: 1400, height: 900 });
  const hydrated = await settledViewport(null);
  // Each click on an eye of a segment with pixels must change the picture: hide Skin (Lesion
  // alone), hide Lesion (the bare photo), show Lesion again, show Skin again (everything).
  const pixels = Object.fromEntries(job.segments.map(({ label, pixels }) => [label, pixels]));
  const eye = (label) => segmentRow(label).locator('[data-cy="data-row-visibility-toggle"]');
  async function toggle(label, name, before) {
    await eye(label).click();
    return settledViewport(name, { changedFrom: pixels[label] > 0 ? before : null });
  }
  const lesionOnly = await toggle('Skin', 'raw-seg-only-lesion.png', hydrated);
  const bare = await toggle('Lesion', 'raw-seg-none.png', lesionOnly);
  const lesionAgain = await toggle('Lesion', null, bare);
  result.lesionOnlyRepeatable = lesionAgain.equals(lesionOnly);
  await toggle('Skin', 'raw-seg-all.png', lesionAgain);
  await pageShot('viewer-seg.png');
  log('segment visibility toggled');

  // --- the SR -----------------------------------------------------------------------------
  await openSeries(job.series.sr);
  // OHIF shows the SR read-only (regions and the report's values) and asks whether to track
  // (hydrate) its measurements; the question stays on top until answered.
  await page.locator('[data-cy="yes-hydrate-btn"]').waitFor();
  const srText = page.locator('[data-cy="viewport-pane"] svg text').first();
  // Seen in about one run of ten, more on a loaded machine: the SR viewport shows the photo
  // without the SR's annotations and loads nothing more. Opening the SR again usually draws
  // them; after three openings the run goes on and the Python test reports what was missed
  // (the viewer itself must still be free of errors).
  result.srAnnotationsShown = false;
  for (let attempt = 1; attempt <= 3 && !result.srAnnotationsShown; attempt += 1) {
    try {
      await srText.waitFor({ timeout: Math.min(timeout, 30000) });
      result.srAnnotationsShown = true;
    } catch {
      result.retries.push({ step: 'SR annotations', pending: pendingUrls() });
      log(`SR annotations did not appear (opening ${attempt}); opening the SR again`);
      await openSeries(job.series.sr);
    }
  }
  if (result.srAnnotationsShown) {
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
  } else {
    log('SR annotations never appeared in three openings');
  }

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
  result.pendingRequests = pendingUrls();
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
