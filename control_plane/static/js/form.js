// The generation form, built from the API's own OpenAPI schema (GenerationCreate): the fields,
// their bounds, steps, choices, defaults and descriptions are the API's, never copies.

import { h, clear } from "./dom.js";

// Carried by the source-image editor, not by an input of their own.
const EDITOR_FIELDS = new Set(["image", "mask"]);
// Only meaningful with a source image.
const SOURCE_FIELDS = new Set(["strength"]);
// Fixed by the source image when there is one.
const SIZE_FIELDS = new Set(["width", "height"]);

/** The schema of one property without its ``null`` alternative. */
function plain(schema) {
  if (Array.isArray(schema.anyOf)) {
    const other = schema.anyOf.find((s) => s.type !== "null");
    return { ...schema, ...other, anyOf: undefined, nullable: true };
  }
  return schema;
}

function label(name, schema) {
  if (name === "num_images") return "Number of images";
  const title = schema.title || name.replaceAll("_", " ");
  return title.charAt(0).toUpperCase() + title.slice(1).toLowerCase();
}

export class GenerationForm {
  /** ``schema``: components.schemas.GenerationCreate of /openapi.json. */
  constructor(container, schema) {
    this.container = container;
    this.schema = schema;
    this.inputs = new Map(); // name -> input element
    this.specs = new Map(); // name -> plain schema
    this.build();
  }

  build() {
    clear(this.container);
    const required = new Set(this.schema.required || []);
    const grid = h("div", { class: "grid" });
    for (const [name, raw] of Object.entries(this.schema.properties || {})) {
      if (EDITOR_FIELDS.has(name)) continue;
      const spec = plain(raw);
      this.specs.set(name, spec);
      const id = `field-${name}`;
      const helpId = `${id}-help`;
      const errorId = `${id}-error`;
      let input;
      if (Array.isArray(spec.enum)) {
        input = h(
          "select",
          { id, name },
          required.has(name) ? null : h("option", { value: "" }, "the model's default"),
          spec.enum.map((choice) => h("option", { value: choice }, choice)),
        );
      } else if (spec.type === "string") {
        const long = name === "prompt";
        input = h(long ? "textarea" : "input", {
          id,
          name,
          rows: long ? 3 : null,
          type: long ? null : "text",
          maxlength: spec.maxLength,
          minlength: spec.minLength,
          required: required.has(name),
          placeholder: spec.examples ? `e.g. ${spec.examples[0]}` : null,
          autocomplete: "off",
        });
      } else if (spec.type === "integer" || spec.type === "number") {
        const min = spec.minimum ?? spec.exclusiveMinimum;
        const step = spec.multipleOf ?? (spec.type === "integer" ? 1 : "any");
        input = h("input", {
          id,
          name,
          type: "number",
          inputmode: spec.type === "integer" ? "numeric" : "decimal",
          min,
          max: spec.maximum,
          step,
          value: spec.default ?? null,
          placeholder: spec.default !== undefined ? null : "model default",
        });
      } else {
        continue;
      }
      input.setAttribute("aria-describedby", `${helpId} ${errorId}`);
      this.inputs.set(name, input);
      const bounds = [];
      if (spec.minimum !== undefined || spec.exclusiveMinimum !== undefined || spec.maximum !== undefined) {
        const low = spec.minimum ?? `more than ${spec.exclusiveMinimum}`;
        const high = Number.isSafeInteger(spec.maximum) || !Number.isInteger(spec.maximum) ? spec.maximum : null;
        bounds.push(high === null || high === undefined ? `${low} or more` : `${low} to ${high}`);
      }
      if (spec.multipleOf && !(spec.description || "").includes("multiple of")) {
        bounds.push(`a multiple of ${spec.multipleOf}`);
      }
      if (spec.maxLength && spec.type === "string") bounds.push(`at most ${spec.maxLength} characters`);
      const help = [required.has(name) ? "required" : null, spec.description, bounds.join(", ")]
        .filter(Boolean)
        .join("; ");
      const wrapper = h(
        "div",
        {
          class: `field field-${spec.type === "string" && !spec.enum ? "text" : "small"}`,
          dataset: { field: name },
        },
        h("label", { for: id }, label(name, spec)),
        input,
        h("p", { id: helpId, class: "help" }, help),
        h("p", { id: errorId, class: "field-error", hidden: true }),
      );
      if (spec.type === "string" && !spec.enum) this.container.append(wrapper);
      else grid.append(wrapper);
    }
    this.container.append(grid);
    this.setSource(false);
  }

  /** With a source image: strength on, width and height off (the image's own). */
  setSource(present) {
    for (const [name, input] of this.inputs) {
      if (SOURCE_FIELDS.has(name)) {
        input.disabled = !present;
        input.closest(".field").hidden = !present;
      }
      if (SIZE_FIELDS.has(name)) input.disabled = present;
    }
  }

  /** The request body: the fields that were filled in, typed as the schema says. */
  values() {
    const body = {};
    for (const [name, input] of this.inputs) {
      if (input.disabled) continue;
      const spec = this.specs.get(name);
      const raw = input.value;
      if (raw === "" || raw === null) continue;
      if (spec.type === "integer") {
        // Seeds reach 2^63 - 1: beyond 2^53 they go as digits, which the API reads exactly.
        const number = Number(raw);
        body[name] = Number.isSafeInteger(number) ? number : raw.trim();
      } else if (spec.type === "number") {
        body[name] = Number(raw);
      } else {
        body[name] = raw;
      }
    }
    return body;
  }

  /** The browser's own check against the schema's bounds; false (and the first field focused) if not. */
  check() {
    this.clearErrors();
    let first = null;
    for (const [name, input] of this.inputs) {
      if (input.disabled) continue;
      const spec = this.specs.get(name);
      input.setCustomValidity("");
      if (spec.exclusiveMinimum !== undefined && input.value !== "" && Number(input.value) <= spec.exclusiveMinimum) {
        input.setCustomValidity(`must be more than ${spec.exclusiveMinimum}`);
      }
      if (!input.checkValidity()) {
        this.showError(name, input.validationMessage);
        first = first || input;
      }
    }
    if (first) first.focus();
    return first === null;
  }

  /** Mark a field invalid with the API's (or the browser's) message; true if the field is here. */
  showError(name, message) {
    const input = this.inputs.get(name);
    if (!input) return false;
    input.setAttribute("aria-invalid", "true");
    const error = document.getElementById(`field-${name}-error`);
    error.textContent = message;
    error.hidden = false;
    return true;
  }

  focus(name) {
    this.inputs.get(name)?.focus();
  }

  clearErrors() {
    for (const [name, input] of this.inputs) {
      input.removeAttribute("aria-invalid");
      const error = document.getElementById(`field-${name}-error`);
      error.textContent = "";
      error.hidden = true;
    }
  }

  /** Fill the form from a job's parameters (to run it again, or tweak it). */
  fill(params) {
    for (const [name, input] of this.inputs) {
      if (params[name] !== undefined && params[name] !== null && typeof params[name] !== "boolean") {
        input.value = String(params[name]);
      }
    }
  }
}
