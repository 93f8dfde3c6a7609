-- Rebuild a period's usage hash from MySQL (when Redis lost it).
-- KEYS: usage hash. ARGV: ttl ms, then (metric, used, version) triples read from MySQL.
-- Version-checked, so a settle racing with the reload can be neither lost nor counted twice.
if redis.call('HEXISTS', KEYS[1], '_loaded') == 1 then return 0 end
for i = 2, #ARGV, 3 do
  local vf = ARGV[i] .. ':v'
  local current = tonumber(redis.call('HGET', KEYS[1], vf) or '-1')
  if tonumber(ARGV[i + 2]) > current then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1], vf, ARGV[i + 2])
  end
end
redis.call('HSET', KEYS[1], '_loaded', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
