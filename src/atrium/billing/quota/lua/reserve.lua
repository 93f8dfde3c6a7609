-- Hold one or several metrics at once, all or none.
-- KEYS: the billing snapshot key, then (usage hash, reservations zset) per metric.
-- ARGV: SHA-1 of the snapshot the limits come from, now ms, then per metric: metric, amount,
-- limit (-1: none), reservation expiry ms, member ("<id>:<amount>"), zset ttl ms.
-- Returns {1} when every hold is in; {-2} when the snapshot changed or is gone (a plan change:
-- reread it); {-1, i} when metric i's hash must be rebuilt first; {0, i, used, reserved} when
-- metric i does not fit (nothing is held then).
-- Reservations are members of a sorted set scored by their expiry: a crashed holder's
-- reservation lapses on its own instead of leaking capacity forever.
local snapshot = redis.call('GET', KEYS[1])
if not snapshot or redis.sha1hex(snapshot) ~= ARGV[1] then return {-2} end
local n = (#KEYS - 1) / 2
for i = 1, n do
  if redis.call('HEXISTS', KEYS[2 * i], '_loaded') == 0 then return {-1, i} end
end
for i = 1, n do
  local zset = KEYS[2 * i + 1]
  local a = 2 + (i - 1) * 6
  redis.call('ZREMRANGEBYSCORE', zset, '-inf', ARGV[2])
  local reserved = 0
  local members = redis.call('ZRANGE', zset, 0, -1)
  for j = 1, #members do
    reserved = reserved + tonumber(string.match(members[j], ':(%d+)$'))
  end
  local used = tonumber(redis.call('HGET', KEYS[2 * i], ARGV[a + 1]) or '0')
  local limit = tonumber(ARGV[a + 3])
  if limit >= 0 and used + reserved + tonumber(ARGV[a + 2]) > limit then
    return {0, i, used, reserved}
  end
end
for i = 1, n do
  local a = 2 + (i - 1) * 6
  redis.call('ZADD', KEYS[2 * i + 1], ARGV[a + 4], ARGV[a + 5])
  redis.call('PEXPIRE', KEYS[2 * i + 1], ARGV[a + 6])
end
return {1}
