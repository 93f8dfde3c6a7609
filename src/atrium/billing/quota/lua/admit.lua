-- A request's rate-limit check and its quota hold in one script: one round trip for both.
-- The two bodies below are filled in when the script is loaded (atrium.billing.quota.scripts):
-- the rate-limit check of atrium.kit.ratelimit (HIT_SCRIPT) and reserve.lua, each run as a
-- function of its own KEYS and ARGV.
-- KEYS: the rate-limit bucket, then reserve.lua's KEYS.
-- ARGV: the check's 9 arguments (atrium.kit.ratelimit.prepare), then reserve.lua's ARGV.
-- Returns {verdict} when the rate limit refuses the request (nothing held, nothing counted);
-- else {verdict, reserve.lua's reply}. A request the quota then refuses stays counted by the
-- rate limit, as when the limit is checked before the hold in a round trip of its own.
local function rate_limit(KEYS, ARGV)
--@rate_limit
end
local function reserve(KEYS, ARGV)
--@reserve
end
local check_keys, check_args, hold_keys, hold_args = {KEYS[1]}, {}, {}, {}
for i = 1, 9 do check_args[i] = ARGV[i] end
for i = 2, #KEYS do hold_keys[i - 1] = KEYS[i] end
for i = 10, #ARGV do hold_args[i - 9] = ARGV[i] end
local verdict = rate_limit(check_keys, check_args)
if verdict[1] >= 0 then return {verdict} end
return {verdict, reserve(hold_keys, hold_args)}
