// One @google/genai call, configured only by the environment (as an app in a pod would be):
// GOOGLE_CLOUD_PROJECT / GOOGLE_CLOUD_LOCATION, ADC, HTTPS_PROXY + NODE_USE_ENV_PROXY or
// GOOGLE_VERTEX_BASE_URL. Prints one JSON line on stdout, an SDK error included, so the
// Python test can assert on what the app would see.
//
//   node genai_call.mjs '{"model": "gemini-2.5-flash", "prompt": "hi", "stream": false}'
import { GoogleGenAI } from '@google/genai';

const request = JSON.parse(process.argv[2] ?? '{}');
const model = request.model ?? 'gemini-2.5-flash';
const contents = request.prompt ?? 'hello';

function report(result) {
  process.stdout.write(JSON.stringify(result) + '\n');
}

try {
  const ai = new GoogleGenAI({ vertexai: true });  // project and location from the environment
  if (request.stream) {
    const chunks = [];
    for await (const chunk of await ai.models.generateContentStream({ model, contents })) {
      chunks.push(chunk.text ?? '');
    }
    report({ ok: true, text: chunks.join(''), chunks });
  } else {
    const response = await ai.models.generateContent({ model, contents });
    report({ ok: true, text: response.text ?? '', chunks: null });
  }
} catch (error) {
  // ApiError carries the HTTP status; anything else (no credentials, TLS, proxy) has none.
  report({ ok: false, error: { name: error?.name ?? 'Error', message: String(error?.message ?? error),
                               status: typeof error?.status === 'number' ? error.status : null } });
}
