-- Mirror a figure committed in MySQL and drop the reservations it settles.
-- KEYS: usage hash, reservations zset. ARGV: metric, member ('' for none), committed used,
-- its version, hash ttl ms, then any further members settled by the same write (a batch).
-- Writes the figure only if newer than what the hash holds; works on a hash that is not loaded
-- yet, so a rebuild racing with this settle keeps the newest figure.
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
for i = 6, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
local vf = ARGV[1] .. ':v'
local current = tonumber(redis.call('HGET', KEYS[1], vf) or '-1')
if tonumber(ARGV[4]) > current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], vf, ARGV[4])
end
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return redis.call('HGET', KEYS[1], ARGV[1])
