"""Lua scripts of the Redis profile store: each one user's atomic read or update, in one round trip.

Every script touches one user's keys only (they share a `{hash tag}`, so one Redis Cluster slot).
RECORD performs, in the same order, the arithmetic of `hyperrec.core.behaviour.apply_events`;
the store contract tests check both give the same profile.
KEYS are always: profile hash, recent list, event-id set, opt-out marker.
"""

from __future__ import annotations

# ARGV: recent limit. Returns {1} for a user who opted out (the profile is not read), else {0, hash, recent}.
READ = """
if redis.call('EXISTS', KEYS[4]) == 1 then return {1} end
return {0, redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[1]) - 1)}
"""

# ARGV: now, half-life s, ttl s, recent limit, dedupe window s, event count, then per event:
# hashed event id, item id, type name, weight (text), time, category count, categories...
# Returns {-1} when opted out, else {seq, {1|0 per event: stored or duplicate}, profile hash, recent list}.
RECORD = """
if redis.call('EXISTS', KEYS[4]) == 1 then return {-1} end
local now, half, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, window, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local function fmt(x) return string.format('%.17g', x) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. fmt(now - window))
local fresh, stored, pos = {}, 0, 7
for e = 1, n do
  local kind, weight, at = ARGV[pos + 2], tonumber(ARGV[pos + 3]), tonumber(ARGV[pos + 4])
  local ncat = tonumber(ARGV[pos + 5])
  fresh[e] = redis.call('ZADD', KEYS[3], 'NX', now, ARGV[pos])
  if fresh[e] == 1 then
    stored = stored + 1
    redis.call('LPUSH', KEYS[2], ARGV[pos + 3] .. '|' .. ARGV[pos + 1])
    for c = 1, ncat do
      local field = 'c:' .. ARGV[pos + 5 + c]
      local old = redis.call('HGET', KEYS[1], field)
      local w, t = weight, at
      if old then
        local sep = string.find(old, '|', 1, true)
        local w0, t0 = tonumber(string.sub(old, 1, sep - 1)), tonumber(string.sub(old, sep + 1))
        if at >= t0 then
          w = w0 * math.pow(2.0, -(at - t0) / half) + weight
        else
          w, t = w0 + weight * math.pow(2.0, -(t0 - at) / half), t0
        end
      end
      redis.call('HSET', KEYS[1], field, fmt(w) .. '|' .. fmt(t))
    end
    redis.call('HINCRBY', KEYS[1], 'n:' .. kind, 1)
    local seen = tonumber(redis.call('HGET', KEYS[1], 'seen') or '0')
    if at > seen then redis.call('HSET', KEYS[1], 'seen', fmt(at)) end
  end
  pos = pos + 6 + ncat
end
local seq
if stored > 0 then
  redis.call('LTRIM', KEYS[2], 0, cap - 1)
  if redis.call('HEXISTS', KEYS[1], 'seq') == 0 then
    -- a new profile's counter starts at the server clock in microseconds, so a profile erased and made again
    -- never repeats a sequence number an in-flight refold may still hold
    local clock = redis.call('TIME')
    redis.call('HSET', KEYS[1], 'seq', clock[1] .. string.format('%06d', tonumber(clock[2])))
  end
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('HSET', KEYS[1], 'upd', fmt(now))
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
else
  seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
end
redis.call('EXPIRE', KEYS[3], math.max(math.ceil(math.min(window, ttl)), 1))  -- never outlives the profile TTL
return {seq, fresh, redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, cap - 1)}
"""

# ARGV: seq, vector bytes, embedding space. Writes only while the profile is at update `seq`.
SET_VECTOR = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], 'seq') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'vec', ARGV[2], 'space', ARGV[3])
return 1
"""

# ARGV: ttl s, interests joined by \\x1f (empty: none).
SET_INTERESTS = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], 'int') else redis.call('HSET', KEYS[1], 'int', ARGV[2]) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1])) end
return 1
"""

# ARGV: ttl s, field count, fields and values of the hash..., then the recent entries.
# Replaces the profile (seeding, backfill) unless the user opted out.
PUT = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
local ttl, nfields = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, 2 + 2 * nfields, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local clock = redis.call('TIME')
redis.call('HSET', KEYS[1], 'seq', clock[1] .. string.format('%06d', tonumber(clock[2])))
redis.call('EXPIRE', KEYS[1], ttl)
local first = 3 + 2 * nfields
if #ARGV >= first then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first))
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""

# Deletes the profile data and sets the opt-out marker. Returns how many profile keys existed.
OPT_OUT = """
local removed = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SET', KEYS[4], '1')
return removed
"""
