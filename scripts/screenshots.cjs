// Screenshots in a real browser (Debian's chromium driven by playwright-core), for
// scripts/screenshots.py:  node scripts/screenshots.cjs <jobs.json>
// jobs.json: {"playwright": "<path of playwright-core>", "shots": [{"url", "file",
//   "wait_for" (text on the page), "cookies" (for the browser), "height" (of the window)}]}
// A fresh profile each time (a temporary --user-data-dir), removed at the end.
const fs = require("fs");
const os = require("os");
const path = require("path");

const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

async function main() {
  const jobs = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const { chromium } = require(jobs.playwright);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "screenshots-profile-"));
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: FLAGS,
    viewport: { width: 1440, height: 1100 },
  });
  try {
    const page = await browser.newPage();
    for (const shot of jobs.shots) {
      if (shot.cookies) await browser.addCookies(shot.cookies);
      await page.setViewportSize({ width: 1440, height: shot.height || 1100 });
      // Both UIs poll their APIs: the page is never idle, so wait for the text instead.
      await page.goto(shot.url, { waitUntil: "load", timeout: 120000 });
      if (shot.wait_for) await page.getByText(shot.wait_for).first().waitFor({ timeout: 120000 });
      await page.waitForTimeout(2000); // images and late layout
      await page.screenshot({ path: shot.file });
      console.log(`screenshot ${shot.file} of ${shot.url}`);
    }
  } finally {
    await browser.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
