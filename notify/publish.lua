-- publish.lua: append a notification to a user's history and publish it, in
-- one atomic step. This file is the language-neutral contract of the
-- websocket-service gateway's history; any backend may run it with EVALSHA
-- (falling back to EVAL or SCRIPT LOAD).
--
-- KEYS[1]  "{<channel>}:h"  the history: a list of "<offset>|<ms>|<check>|<json>"
-- KEYS[2]  "{<channel>}:m"  its metadata: hash e (epoch), o (newest offset)
-- KEYS[3]  optional "{<channel>}:i:<idempotency key>"
-- ARGV[1]  the channel, "<prefix>:<user id>" (the hash tag above keeps every key in its slot)
-- ARGV[2]  the notification, a JSON object
-- ARGV[3]  retained entries at most (e.g. 100)
-- ARGV[4]  retained age at most, in milliseconds (e.g. 300000); also the keys' expiry
-- ARGV[5]  expiry of the metadata in milliseconds (at least ARGV[4], e.g. 86400000)
-- ARGV[6]  "1": SPUBLISH (gateways in sharded mode), else PUBLISH
-- ARGV[7]  optional: the largest notification in bytes, id included (the
--          gateways' WEBSOCKET_MAX_MESSAGE_BYTES, e.g. 65536); absent or 0:
--          no limit (callers written for six arguments keep working)
--
-- Refused with an error, neither stored nor sent: a notification that is
-- not a valid JSON object, one with a top-level "id" of its own ("id" is
-- reserved: the history id goes there), and one larger than ARGV[7]; the
-- gateway would drop these live, and a replay must not bring them back.
--
-- The published JSON is the notification with a first field "id":
-- "<epoch>-<offset>-<check>". The epoch changes whenever the history is
-- created anew (lost, flushed, expired); offsets count up from 1 within an
-- epoch; the check is the microsecond the entry was appended, so an offset
-- reused after a failover lost the tail does not pass for the lost entry.
-- Returns {id, receivers}; a retried idempotency key returns {id, -1} and
-- neither stores nor publishes again.

local hist, meta, channel, payload = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local maxlen, maxage, metattl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

if KEYS[3] then
  local prev = redis.call('GET', KEYS[3])
  if prev then
    return {prev, -1}
  end
end

local _, brace = string.find(payload, '^%s*{%s*')
if not brace then
  return redis.error_reply('ERR notification is not a JSON object')
end
local valid, doc = pcall(cjson.decode, payload)
if not valid or type(doc) ~= 'table' then
  return redis.error_reply('ERR notification is not valid JSON')
end
if doc['id'] ~= nil then
  return redis.error_reply('ERR notification has a top-level "id" of its own: "id" is reserved for the history id')
end

local t = redis.call('TIME')
local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(us / 1000)

-- base36 spells a whole number compactly.
local function base36(n)
  local digits, s = '0123456789abcdefghijklmnopqrstuvwxyz', ''
  repeat
    local d = n % 36
    s = string.sub(digits, d + 1, d + 1) .. s
    n = (n - d) / 36
  until n == 0
  return s
end

-- The check is the microsecond of the append: an offset reused after a
-- failover lost the tail is appended at another instant.
local check = base36(us)
-- The id is made before anything is written: a refused notification leaves
-- the history as it was (a script's writes before an error stay).
local offset = (tonumber(redis.call('HGET', meta, 'o')) or 0) + 1
local epoch = check -- a new history: its epoch is this microsecond
if offset > 1 then
  epoch = redis.call('HGET', meta, 'e')
end
local id = epoch .. '-' .. offset .. '-' .. check
local rest = string.sub(payload, brace + 1)
local sep = ','
if string.sub(rest, 1, 1) == '}' then
  sep = ''
end
local msg = '{"id":"' .. id .. '"' .. sep .. rest
local maxbytes = tonumber(ARGV[7] or '0') or 0
if maxbytes > 0 and #msg > maxbytes then
  return redis.error_reply('ERR notification too large: ' .. #msg .. ' bytes with its id, limit ' .. maxbytes)
end
if offset == 1 then
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'e', epoch, 'o', offset)
else
  redis.call('HSET', meta, 'o', offset)
end

if redis.call('RPUSH', hist, offset .. '|' .. now .. '|' .. check .. '|' .. msg) > maxlen then
  redis.call('LTRIM', hist, -maxlen, -1)
end
while true do
  local first = redis.call('LINDEX', hist, 0)
  if not first then
    break
  end
  local ts = tonumber(string.match(first, '^%d+|(%d+)|'))
  if ts == nil or now - ts <= maxage then
    break
  end
  redis.call('LPOP', hist)
end
redis.call('PEXPIRE', hist, maxage)
redis.call('PEXPIRE', meta, math.max(metattl, maxage))
if KEYS[3] then
  redis.call('SET', KEYS[3], id, 'PX', maxage)
end

local receivers
if ARGV[6] == '1' then
  receivers = redis.call('SPUBLISH', channel, msg)
else
  receivers = redis.call('PUBLISH', channel, msg)
end
return {id, receivers}
