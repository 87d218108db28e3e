// Drives Debian's chromium against the live dashboard:
//   node dashboard.mjs URL SCREENSHOT CLUSTER NODE [ATTACK_URL]
// With ATTACK_URL, first opens that page (another origin's, which tries to
// change the balancer through the browser and sets window.attackDone) and
// notes what it tried and whether its frame of the dashboard loaded. Then
// waits for live numbers that move, clicks "yellow" on CLUSTER/NODE
// (accepting the confirmation), waits for the page to show it, saves a
// screenshot, and prints one JSON line with what it saw. Exit 0 on success,
// 1 otherwise.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, screenshot, cluster, node, attackUrl] = process.argv.slice(2);
if (!url || !screenshot || !cluster || !node) {
  console.error("usage: node dashboard.mjs URL SCREENSHOT CLUSTER NODE [ATTACK_URL]");
  process.exit(2);
}
const TIMEOUT = 90_000;
const profile = mkdtempSync(join(tmpdir(), "protobalance-chromium-"));
let context;
const result = { ok: false };
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1440, height: 640 },
    timeout: TIMEOUT,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);
  const dialogs = [];
  page.on("dialog", (d) => { dialogs.push(d.message()); d.accept(); });
  if (attackUrl) {
    await page.goto(attackUrl);
    await page.waitForFunction(() => window.attackDone === true, null, { timeout: TIMEOUT, polling: 100 });
    result.attack = await page.evaluate(() => window.attackLog);
    const framed = page.frames().find((f) => f.name() === "framed");
    result.framed_url = framed ? framed.url() : null;
    result.framed_rows = framed ? await framed.locator("tr[data-node]").count().catch(() => -1) : -1;
  }
  await page.goto(url);

  const row = page.locator(`tr[data-node="${cluster}/${node}"]`);
  await row.waitFor();
  const total = async () => Number(await row.locator(".total").textContent());
  const first = await total();
  // Live numbers: the total grows under load, and the page's rate is above zero.
  await page.waitForFunction(
    ([sel, before]) => Number(document.querySelector(sel + " .total").textContent) > before,
    [`tr[data-node="${cluster}/${node}"]`, first], { timeout: TIMEOUT, polling: 200 });
  await page.waitForFunction(
    (sel) => parseFloat(document.querySelector(sel + " .crate").textContent) > 0,
    `tr[data-node="${cluster}/${node}"]`, { timeout: TIMEOUT, polling: 200 });
  result.total_before = first;
  result.total_after = await total();
  result.connection_rate = await row.locator(".crate").textContent();
  result.traffic_rate = await row.locator(".trate").textContent();

  await row.locator('button[data-set-state="yellow"]').click();
  await page.waitForFunction(
    (sel) => document.querySelector(sel + " .state").textContent === "yellow",
    `tr[data-node="${cluster}/${node}"]`, { timeout: TIMEOUT, polling: 200 });
  result.dialogs = dialogs;
  result.state_shown = await row.locator(".state").textContent();
  // What each node's health cell says besides its health (checks, ports, ramps, drains).
  await page.waitForFunction(
    () => [...document.querySelectorAll("tr[data-node] .health-note")].some((n) => n.textContent.startsWith("check failing")),
    null, { timeout: TIMEOUT, polling: 200 }).catch(() => {});
  result.notes = await page.$$eval("tr[data-node]", (rows) =>
    rows.map((r) => [r.dataset.node, r.querySelector(".health-note").textContent]));
  // Let the charts gather a few more points for the picture, scrolled back home.
  await page.waitForTimeout(6000);
  await page.evaluate(() => { for (const c of document.querySelectorAll(".card")) c.scrollLeft = 0; window.scrollTo(0, 0); });
  await page.screenshot({ path: screenshot, fullPage: true });
  result.ok = true;
} catch (e) {
  result.error = String(e && e.stack || e);
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
