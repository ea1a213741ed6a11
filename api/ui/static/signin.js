"use strict";
(async function signin() {
  const form = document.getElementById("signin-form");
  const input = document.getElementById("api-key");
  const error = document.getElementById("api-key-error");
  const next = new URLSearchParams(location.search).get("next") || "/ui/jobs";
  const target = next.startsWith("/ui/") ? next : "/ui/jobs";  // never off this site
  try {  // open mode: the API answers without a key
    await Speft.api("/v1/models", { key: "", noRedirect: true });
    document.getElementById("open-mode").hidden = false;
  } catch (_) { /* a key is needed */ }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const key = input.value.trim();
    if (!key) { error.textContent = "Enter an API key."; input.focus(); return; }
    try {
      await Speft.api("/v1/models", { key, noRedirect: true });
      Speft.setKey(key);
      location.href = target;
    } catch (err) {
      error.textContent = err.status === 401 ? "This API key was refused." : err.message;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  });
})();
