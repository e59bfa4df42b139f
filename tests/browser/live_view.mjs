// Real-browser test of the `weir serve` live page: starts `weir serve` on the memory
// backend, opens the page in Debian's headless Chromium, posts events over HTTP and checks
// that the table, the chart and the counters show the window results; saves a screenshot.
//
//   WEIR_BIN=target/debug/weir node tests/browser/live_view.mjs   (scripts/test-browser)
//
// Env: WEIR_BIN (the weir binary), CHROMIUM (default /usr/bin/chromium),
// WEIR_BROWSER_OUT (screenshot folder, default target/browser-test).
import { spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const bin = process.env.WEIR_BIN || join(root, "target/debug/weir");
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const outDir = resolve(process.env.WEIR_BROWSER_OUT || join(root, "target/browser-test"));

function fail(msg) {
  throw new Error(msg);
}

async function startServer() {
  const env = { ...process.env, WEIR_LOG: "warn" };
  delete env.WEIR_BROKER;
  const child = spawn(bin, [
    "serve", join(root, "pipelines/user_activity.toml"),
    "--listen", "127.0.0.1:0",
    "--set", "brokers.memory.partitions=1",
  ], { env, stdio: ["ignore", "pipe", "inherit"] });
  const lines = createInterface({ input: child.stdout });
  const url = await new Promise((ok, no) => {
    const timer = setTimeout(() => no(new Error("weir serve printed no URL within 30 s")), 30_000);
    child.on("exit", (code) => no(new Error(`weir serve exited with ${code} before listening`)));
    lines.once("line", (line) => {
      clearTimeout(timer);
      const m = line.match(/http:\/\/\S+?\//);
      m ? ok(m[0]) : no(new Error(`no URL in ${JSON.stringify(line)}`));
    });
  });
  return { child, url };
}

const event = (user, time) => ({
  event_type: "page_view", user_id: user, action: "view", timestamp: time,
  metadata: { page: "/search" },
});

// The chart's time labels: at least two, the latest window's among them, none overlapping
// another, none squeezed (at least 9 px high), all inside the chart.
async function checkLabels(page, width) {
  const labels = await page.evaluate(() => {
    const chart = document.querySelector("#chart").getBoundingClientRect();
    return { chart: { left: chart.left, right: chart.right },
      boxes: [...document.querySelectorAll("#chart text.time")].map((t) => {
        const b = t.getBoundingClientRect();
        return { text: t.textContent, left: b.left, right: b.right, height: b.height };
      }) };
  });
  const boxes = labels.boxes.sort((a, b) => a.left - b.left);
  if (boxes.length < 2) fail(`at ${width} px the chart has ${boxes.length} time labels`);
  if (boxes[boxes.length - 1].text !== "15:03:10") fail(`at ${width} px the latest label is ${boxes[boxes.length - 1].text}`);
  for (let i = 1; i < boxes.length; i++) {
    if (boxes[i].left < boxes[i - 1].right + 2) {
      fail(`at ${width} px labels ${boxes[i - 1].text} and ${boxes[i].text} overlap`);
    }
  }
  for (const b of boxes) {
    if (b.height < 9) fail(`at ${width} px label ${b.text} is ${b.height} px high`);
    if (b.left < labels.chart.left - 1 || b.right > labels.chart.right + 1) fail(`at ${width} px label ${b.text} is outside the chart`);
  }
}

async function main() {
  mkdirSync(outDir, { recursive: true });
  const shot = join(outDir, "live_view.png");
  const { child, url } = await startServer();
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  try {
    await page.goto(url);
    await page.locator("#status.live").waitFor({ timeout: 10_000 });
    if ((await page.textContent("#pipeline")) !== "user_activity") fail("the page did not get the hello");

    // Window [15:00:00, 15:00:10): User1 x3, User2 x2, User3 x1; then a 15:00:30 event
    // moves the watermark past its end + grace, and the window closes.
    const events = [
      ...[1, 2, 3].map((s) => event("User1", `2024-06-27 15:00:0${s}.000000`)),
      ...[4, 5].map((s) => event("User2", `2024-06-27 15:00:0${s}.000000`)),
      event("User3", "2024-06-27 15:00:06.000000"),
      event("User3", "2024-06-27 15:00:30.000000"),
    ];
    for (const ev of events) {
      const r = await fetch(new URL("/track", url), { method: "POST", body: JSON.stringify(ev) });
      if (r.status !== 202) fail(`POST /track answered ${r.status}: ${await r.text()}`);
    }
    const want = { User1: "3", User2: "2", User3: "1" };
    for (const [user, count] of Object.entries(want)) {
      const cell = page.locator(`#results tr[data-window="2024-06-27T15:00:00Z"][data-key="${user}"] td.v-count`);
      await cell.waitFor({ timeout: 15_000 });
      const got = await cell.textContent();
      if (got !== count) fail(`${user}: the table shows ${got}, expected ${count}`);
    }
    const bars = await page.locator("#chart rect").count();
    if (bars !== 3) fail(`the chart has ${bars} bars, expected 3 (one per user)`);
    await page.waitForFunction(() => document.querySelector("#c-results_out").textContent === "3", null, { timeout: 5_000 });
    if ((await page.textContent("#c-events_in")) !== "7") fail("events-in counter is not 7");

    // Fourteen more windows (15:01:00 … 15:03:10), closed by an event at 15:10:00: the
    // chart shows the latest twelve, and its time labels must never overlap.
    for (let k = 0; k < 14; k++) {
      const t = new Date(Date.UTC(2024, 5, 27, 15, 1, 0) + k * 10_000 + 1_000);
      const time = t.toISOString().replace("T", " ").replace("Z", "000");
      const r = await fetch(new URL("/track", url), { method: "POST", body: JSON.stringify(event(`User${k % 3 + 1}`, time)) });
      if (r.status !== 202) fail(`POST /track answered ${r.status}`);
    }
    await fetch(new URL("/track", url), { method: "POST", body: JSON.stringify(event("User1", "2024-06-27 15:10:00.000000")) });
    await page.locator('#results tr[data-window="2024-06-27T15:03:10Z"]').waitFor({ timeout: 15_000 });
    await checkLabels(page, 1280);
    await page.screenshot({ path: shot, fullPage: true });

    // A phone: 390 px wide. Nothing may stick out sideways, labels keep their size and
    // do not overlap, the counters and the table stay on the page.
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForFunction(() => Math.abs(document.querySelector("#chart").viewBox.baseVal.width
      - document.querySelector("#chart").getBoundingClientRect().width) < 2, null, { timeout: 5_000 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    if (overflow > 0) fail(`at 390 px the page scrolls sideways by ${overflow} px`);
    for (const id of ["#c-events_in", "#chart", "#results"]) {
      const box = await page.locator(id).boundingBox();
      if (!box || box.x < 0 || box.x + Math.min(box.width, 390) > 390.5) fail(`${id} is not within the 390 px page: ${JSON.stringify(box)}`);
    }
    await checkLabels(page, 390);
    const phone = join(outDir, "live_view-390.png");
    await page.screenshot({ path: phone, fullPage: true });
    if (errors.length) fail(`page errors: ${errors.join("; ")}`);
    console.log(`browser test: the live page shows User1=3, User2=2, User3=1 in 3 bars; 12 windows with non-overlapping labels at 1280 and 390 px; screenshots ${shot}, ${phone}`);
  } catch (e) {
    await page.screenshot({ path: join(outDir, "live_view-failed.png"), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await browser.close();
    child.kill();
  }
}

main().then(
  () => { console.log("1 passed, 0 failed"); process.exit(0); },
  (e) => { console.error(`browser test FAILED: ${e.message}`); console.log("0 passed, 1 failed"); process.exit(1); },
);
