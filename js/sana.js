// Sana pack frontend: the aspect-ratio presets drive width/height (multiples of 32), and the DiT loader shows
// the variant it detected from the weights.
import { app } from "../../scripts/app.js";

const snap32 = (v) => Math.max(32, Math.round(v / 32) * 32);

function chain(object, name, fn) {
  const original = object[name];
  object[name] = function () {
    const result = original?.apply(this, arguments);
    fn.apply(this, arguments);
    return result;
  };
}

app.registerExtension({
  name: "comfyui-sana.nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "SanaEmptyLatentImage") {
      chain(nodeType.prototype, "onNodeCreated", function () {
        const widget = (name) => this.widgets?.find((w) => w.name === name);
        const [width, height, preset] = [widget("width"), widget("height"), widget("preset")];
        for (const w of [width, height]) {
          chain(w, "callback", () => { if (w.value % 32) w.value = snap32(w.value); });
        }
        chain(preset, "callback", () => {
          const match = /(\d+)x(\d+)/.exec(preset.value);
          if (match) {
            width.value = Number(match[1]);
            height.value = Number(match[2]);
            app.graph.setDirtyCanvas(true);
          }
        });
      });
    }
    if (nodeData.name === "SanaCheckpointLoader") {
      chain(nodeType.prototype, "onExecuted", function (message) {
        const variant = message?.sana_variant?.[0];
        if (variant) {
          this.sanaVariant = variant;
          app.graph.setDirtyCanvas(true);
        }
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) {
        if (!this.sanaVariant || this.flags?.collapsed) return;
        ctx.save();
        ctx.font = "12px sans-serif";
        ctx.fillStyle = "#8fbf8f";
        ctx.fillText(`detected: ${this.sanaVariant}`, 10, this.size[1] - 8);
        ctx.restore();
      });
    }
  },
});
