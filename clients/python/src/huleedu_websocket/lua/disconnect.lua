-- disconnect.lua: closes every socket of one user on every gateway instance
-- (close code 4004 REVOKED) and, when asked, revokes the user's tokens issued
-- up to now. One atomic step in the user's slot.
--
-- KEYS[1]  {<channel>}:r   the user's revocation: unix seconds (Redis TIME);
--                          tokens with iat <= it are refused while it lives
-- ARGV[1]  channel         <prefix>:<user_id>
-- ARGV[2]  reason          shown to the client (the gateway bounds its length)
-- ARGV[3]  revoke          "1" to revoke, "0" to disconnect only
-- ARGV[4]  revoke_ttl_ms   how long the revocation is kept: the longest life
--                          a token issued before now can still have
-- ARGV[5]  sharded         "1": SPUBLISH (gateways in sharded mode)
--
-- The control message starts with a NUL byte: no JSON notification (and
-- nothing publish.lua accepts) can be mistaken for it, and it travels on the
-- user's own channel, so it reaches exactly the instances holding the user's
-- sockets in every topology. Returns {revoked_at (0 if not revoking),
-- instances that received it}.
local revoked_at = 0
if ARGV[3] == '1' then
  revoked_at = tonumber(redis.call('TIME')[1])
  local prev = tonumber(redis.call('GET', KEYS[1]) or '0')
  if prev > revoked_at then revoked_at = prev end
  local ttl = tonumber(ARGV[4])
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > ttl then ttl = pttl end
  redis.call('SET', KEYS[1], revoked_at, 'PX', ttl)
end
local msg = '\0' .. cjson.encode({op = 'disconnect', reason = ARGV[2], revoked_at = revoked_at})
local cmd = 'PUBLISH'
if ARGV[5] == '1' then cmd = 'SPUBLISH' end
return {revoked_at, redis.call(cmd, ARGV[1], msg)}
