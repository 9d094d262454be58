// Drives the real ComfyUI frontend in headless Chromium (run by test_comfyui_e2e.py):
//   node frontend_check.cjs URL workflow.json...
// Prints JSON: for each workflow the node types the frontend does not know and the API prompt it makes
// (graphToPrompt), the preset/snap behaviour of our SanaEmptyLatentImage widgets, and the page errors raised
// after the frontend booted (the stock 1.27 frontend itself throws one while restoring settings headless).
const fs = require("fs");
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

(async () => {
  const [url, ...files] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
                                          args: ["--no-sandbox"] });
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.SanaSampler,
                             null, { timeout: 90000 });
  errors.length = 0;
  const workflows = {};
  for (const file of files) {
    const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
    workflows[file] = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf);
      const missing = window.app.graph._nodes.map((n) => n.type)
        .filter((t) => !window.LiteGraph.registered_node_types[t]);
      return { missing, prompt: (await window.app.graphToPrompt()).output };
    }, workflow);
  }
  const widget = await page.evaluate(() => {
    const node = window.LiteGraph.createNode("SanaEmptyLatentImage");
    window.app.graph.add(node);
    const w = (name) => node.widgets.find((x) => x.name === name);
    const preset = w("preset");
    preset.value = preset.options.values.find((v) => v.startsWith("1024:") && v.endsWith("(16:9)"));
    preset.callback(preset.value);
    const fromPreset = [w("width").value, w("height").value];
    w("width").value = 1000;
    w("width").callback(1000);
    return { preset: preset.value, fromPreset, snapped: w("width").value };
  });
  console.log(JSON.stringify({ workflows, widget, errors }));
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
