// The Vercel AI SDK's generateImage as its users call it, for tests/e2e/test_clients.py.
// node ai_sdk.mjs BASE_URL '{"provider": "openai" | "compatible", "model", "prompt", "images": [paths], "mask": path, ...}'
// prints {"images": [{"base64", "mediaType"}], "calls": <requests made>, "warnings": [...]} on one line.
import { readFileSync } from "node:fs";

import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateImage } from "ai";

const [baseURL, json] = process.argv.slice(2);
const call = JSON.parse(json);
const apiKey = "unused";
// @ai-sdk/openai takes only OpenAI's own options; openai-compatible sends providerOptions[name] as body fields.
const model =
  call.provider === "openai"
    ? createOpenAI({ baseURL, apiKey }).image(call.model)
    : createOpenAICompatible({ name: "fluxd", baseURL, apiKey }).imageModel(call.model);
const images = (call.images ?? []).map((path) => readFileSync(path));
const mask = call.mask ? { mask: readFileSync(call.mask) } : {};

const result = await generateImage({
  model,
  prompt: images.length ? { images, text: call.prompt, ...mask } : call.prompt,
  n: call.n,
  size: call.size,
  providerOptions: call.providerOptions,
  maxRetries: 0,
});
console.log(
  JSON.stringify({
    images: result.images.map((image) => ({ base64: image.base64, mediaType: image.mediaType })),
    calls: result.responses.length,
    warnings: result.warnings,
  }),
);
