// Pages without a session: sign up, log in, the mail links (verify, reset, invitation), and
// forgotten passwords.

import { ApiError, api, errorText, isLoggedIn, login as startSession } from "../api.js";
import { add, h, replace } from "../dom.js";
import { field, form, notice } from "../forms.js";
import { navigate } from "../router.js";
import { loadMeta, loadTenants, loadUser, resetState } from "../state.js";

/** A same-origin path to go to after login, or "/". */
function safeNext(value) {
  if (!value || !value.startsWith("/") || value.startsWith("//") || value.startsWith("/\\")) {
    return "/";
  }
  return value;
}

async function passwordHint() {
  try {
    const meta = await loadMeta();
    return `At least ${meta.password_min_length} characters; not your e-mail address.`;
  } catch {
    return "Choose a long password you do not use elsewhere.";
  }
}

function resendVerification(email) {
  const out = h("div", { class: "resend" });
  const f = form(
    {
      submitLabel: "Send a new verification link",
      busyLabel: "Sending…",
      class: "stack compact",
      label: "Send a new verification link",
      onSubmit: async (v) => {
        const res = await api("POST", "/v1/auth/request-verify-token", { json: { email: v.email } });
        replace(out, notice(res.detail, "success"));
      },
    },
    field({ label: "E-mail address", name: "email", type: "email", value: email || "", autocomplete: "email" }),
  );
  add(out, f);
  return out;
}

/** Sign up: account and first workspace; then the verification mail. */
export async function signup(ctx) {
  const { root } = ctx;
  add(root, 
    h("h1", {}, "Create your account"),
    h("p", {}, "Already have an account? ", h("a", { href: "/login" }, "Log in"), "."),
  );
  const hint = await passwordHint();
  const f = form(
    {
      submitLabel: "Create account",
      busyLabel: "Creating your account…",
      errorOpts: { fieldFor: { 409: "email" } },
      onSubmit: async (v) => {
        const body = { name: v.name, email: v.email, password: v.password };
        if (v.tenant_name && v.tenant_name.trim()) body.tenant_name = v.tenant_name;
        const res = await api("POST", "/v1/auth/register", { json: body });
        replace(
          root,
          h("h1", { tabindex: "-1" }, "Check your inbox"),
          notice(
            `We sent a link to ${res.user.email}. Follow it to verify your address, then log in.`,
            "success",
          ),
          h("p", {}, "No mail after a few minutes? Look in the spam folder, or send a new link:"),
          resendVerification(res.user.email),
        );
        root.querySelector("h1").focus();
      },
    },
    field({ label: "Your name", name: "name", autocomplete: "name" }),
    field({ label: "E-mail address", name: "email", type: "email", autocomplete: "email", required: true }),
    field({ label: "Password", name: "password", type: "password", autocomplete: "new-password", required: true, hint }),
    field({
      label: "Workspace name",
      name: "tenant_name",
      hint: "Optional: the workspace your collections and keys live in. You can add more later.",
    }),
  );
  add(root, f);
}

/** Log in; the refresh token goes into the HttpOnly cookie, the access token into memory. */
export async function login(ctx) {
  const { root, query } = ctx;
  const next = safeNext(query.get("next"));
  if (isLoggedIn()) {
    navigate(next, { replace: true });
    return;
  }
  add(root, h("h1", {}, "Log in"));
  if (query.get("logged_out")) add(root, notice("You are logged out.", "success"));
  if (query.get("ended")) add(root, notice("Your session ended. Log in again to continue.", "info"));
  if (query.get("deleted")) add(root, notice("Your account was deleted.", "success"));
  if (query.get("verified")) add(root, notice("Your address is verified. You can log in now.", "success"));
  const extra = h("div");
  const f = form(
    {
      submitLabel: "Log in",
      busyLabel: "Logging in…",
      onSubmit: async (v) => {
        replace(extra);
        try {
          await startSession(v.username, v.password);
        } catch (err) {
          // An address not verified yet gets the answer of a wrong password (the API must not
          // tell which addresses have accounts) and a new link by mail: say so.
          if (err instanceof ApiError && err.status === 401) {
            replace(
              extra,
              notice(
                "If the address is registered and not verified yet, we sent a new verification link: follow it, then log in.",
                "info",
              ),
            );
          }
          throw err;
        }
        resetState();
        navigate(next, { replace: true });
      },
    },
    field({
      label: "E-mail address",
      name: "username",
      type: "email",
      autocomplete: "username",
      required: true,
      value: query.get("email") || "",
    }),
    field({ label: "Password", name: "password", type: "password", autocomplete: "current-password", required: true }),
  );
  add(root, 
    f,
    extra,
    h(
      "p",
      {},
      h("a", { href: "/forgot-password" }, "Forgot your password?"),
      " · ",
      h("a", { href: "/signup" }, "Create an account"),
    ),
  );
}

/** The page the verification mail links to: it posts the token to POST /v1/auth/verify. */
export async function verifyEmail(ctx) {
  const { root, query } = ctx;
  const token = query.get("token");
  // The token has done its job once read: keep it out of the history and the address bar.
  history.replaceState(null, "", "/verify-email");
  add(root, h("h1", {}, "Verify your e-mail address"));
  if (!token) {
    add(root, 
      notice("This page needs the link from the verification mail. Ask for a new one:", "info"),
      resendVerification(""),
    );
    return;
  }
  const status = h("p", { role: "status" }, "Verifying your address…");
  add(root, status);
  try {
    const user = await api("POST", "/v1/auth/verify", { json: { token } });
    const next = isLoggedIn()
      ? h("p", {}, h("a", { href: "/account", class: "button primary" }, "Back to your account"))
      : h(
        "p",
        {},
        h(
          "a",
          { href: `/login?verified=1&email=${encodeURIComponent(user.email)}`, class: "button primary" },
          "Log in",
        ),
      );
    if (isLoggedIn()) await loadUser(true).catch(() => null);
    status.replaceWith(notice(`Your address ${user.email} is verified.`, "success"), next);
  } catch (err) {
    status.replaceWith(notice(errorText(err), "error"), resendVerification(""));
  }
}

/** Ask for a password reset mail. */
export async function forgotPassword(ctx) {
  const { root } = ctx;
  add(root, 
    h("h1", {}, "Forgot your password?"),
    h("p", {}, "Enter your address: we will mail you a link to choose a new password."),
  );
  const out = h("div");
  add(root, 
    form(
      {
        submitLabel: "Send the link",
        busyLabel: "Sending…",
        onSubmit: async (v) => {
          const res = await api("POST", "/v1/auth/forgot-password", { json: { email: v.email } });
          replace(out, notice(res.detail, "success"));
        },
      },
      field({ label: "E-mail address", name: "email", type: "email", autocomplete: "email", required: true }),
    ),
    out,
    h("p", {}, h("a", { href: "/login" }, "Back to log in")),
  );
}

/** The page the reset mail links to. */
export async function resetPassword(ctx) {
  const { root, query } = ctx;
  const token = query.get("token");
  history.replaceState(null, "", "/reset-password");
  add(root, h("h1", {}, "Choose a new password"));
  if (!token) {
    add(root, 
      notice("This page needs the link from the reset mail.", "info"),
      h("p", {}, h("a", { href: "/forgot-password" }, "Ask for a new link")),
    );
    return;
  }
  const hint = await passwordHint();
  const f = form(
    {
      submitLabel: "Set the new password",
      busyLabel: "Saving…",
      onSubmit: async (v) => {
        const res = await api("POST", "/v1/auth/reset-password", { json: { token, password: v.password } });
        replace(
          root,
          h("h1", { tabindex: "-1" }, "Password changed"),
          notice(`${res.detail} Every session was logged out.`, "success"),
          h("p", {}, h("a", { href: "/login", class: "button primary" }, "Log in")),
        );
        root.querySelector("h1").focus();
      },
    },
    field({ label: "New password", name: "password", type: "password", autocomplete: "new-password", required: true, hint }),
  );
  add(root, f);
}

/** The page the invitation mail links to: join as the signed-in user, or create the account. */
export async function acceptInvitation(ctx) {
  const { root, query } = ctx;
  const token = query.get("token");
  add(root, h("h1", {}, "You are invited"));
  if (!token) {
    add(root, notice("This page needs the link from the invitation mail.", "info"));
    return;
  }
  const joined = async (res, loggedIn) => {
    if (loggedIn) {
      await loadTenants(true).catch(() => null);
      replace(
        root,
        h("h1", { tabindex: "-1" }, `Welcome to ${res.tenant.name}`),
        notice(`You joined ${res.tenant.name} as ${res.tenant.role}.`, "success"),
        h("p", {}, h("a", { href: `/tenants/${res.tenant.id}/collections`, class: "button primary" }, "Open the workspace")),
      );
    } else {
      const next = `/tenants/${res.tenant.id}/collections`;
      replace(
        root,
        h("h1", { tabindex: "-1" }, "Your account is ready"),
        notice(`Your account was created and joined ${res.tenant.name}. Log in with the invited address.`, "success"),
        h("p", {}, h("a", { href: `/login?next=${encodeURIComponent(next)}`, class: "button primary" }, "Log in")),
      );
    }
    root.querySelector("h1").focus();
  };
  if (isLoggedIn()) {
    const user = await loadUser().catch(() => null);
    add(root, 
      h("p", {}, `Accept the invitation as ${user ? user.email : "the signed-in user"}. It must have been sent to this address.`),
      form(
        {
          submitLabel: "Accept the invitation",
          busyLabel: "Joining…",
          onSubmit: async () => {
            const res = await api("POST", "/v1/invitations/accept", { json: { token } });
            await joined(res, true);
          },
        },
      ),
    );
    return;
  }
  const here = location.pathname + location.search;
  const hint = await passwordHint();
  add(root, 
    h("h2", {}, "Already have an account?"),
    h("p", {}, h("a", { href: `/login?next=${encodeURIComponent(here)}` }, "Log in to accept"), " with the address the invitation was sent to."),
    h("h2", {}, "New to Atrium?"),
    h("p", {}, "Create your account for the invited address:"),
    form(
      {
        submitLabel: "Create account and join",
        busyLabel: "Creating…",
        onSubmit: async (v) => {
          const res = await api("POST", "/v1/invitations/accept", {
            json: { token, name: v.name, password: v.password },
          });
          await joined(res, false);
        },
      },
      field({ label: "Your name", name: "name", autocomplete: "name" }),
      field({ label: "Password", name: "password", type: "password", autocomplete: "new-password", required: true, hint }),
    ),
  );
}
