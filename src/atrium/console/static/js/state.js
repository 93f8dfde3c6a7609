// What the console knows about the signed-in person: their account, tenants and the role table.

import { api } from "./api.js";

export const state = {
  user: null,
  tenants: null,
  meta: null,
};

/** The signed-in account (GET /v1/users/me). */
export async function loadUser(force = false) {
  if (!state.user || force) state.user = await api("GET", "/v1/users/me");
  return state.user;
}

/** The caller's tenants with their role in each (first 100). */
export async function loadTenants(force = false) {
  if (!state.tenants || force) {
    const page = await api("GET", "/v1/tenants", { query: { size: 100 } });
    state.tenants = page.items;
  }
  return state.tenants;
}

/** Roles, scopes and upload facts from the server (GET /console/meta). */
export async function loadMeta() {
  if (!state.meta) state.meta = await api("GET", "/console/meta");
  return state.meta;
}

/** The tenant with this id among the caller's, or undefined. */
export function tenantById(id) {
  return (state.tenants || []).find((t) => t.id === id);
}

/** Whether the caller's role in `tenant` grants `permission` (the server decides anyway). */
export function can(tenant, permission) {
  if (!tenant || !state.meta) return false;
  return (state.meta.role_permissions[tenant.role] || []).includes(permission);
}

/** Forget everything (logout). */
export function resetState() {
  state.user = null;
  state.tenants = null;
}
