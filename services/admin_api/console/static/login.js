"use strict";
document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("login-error");
  error.hidden = true;
  const body = {
    username: document.getElementById("username").value,
    password: document.getElementById("password").value,
  };
  let response;
  try {
    response = await fetch("/console/login", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
  } catch (e) {
    error.textContent = "The admin API cannot be reached";
    error.hidden = false;
    return;
  }
  if (response.ok) {
    window.location.assign("/console/");
    return;
  }
  let message = "Log-in failed";
  try { message = (await response.json()).message || message; } catch (e) { /* not JSON */ }
  error.textContent = message;
  error.hidden = false;
});
