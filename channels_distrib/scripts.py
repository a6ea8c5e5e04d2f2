"""Every Lua script the layer runs, each documented with its KEYS, ARGV and return value.

The key layout is in :mod:`channels_distrib.keys`. Scripts that must reach keys named by data
(a group's nodes' inboxes, a dead node's channels) build those names from the prefix in ARGV;
that is allowed on a standalone server and a Sentinel master. A Redis Cluster deployment
splits these into a read plus pipelined writes instead (see DESIGN.md).

Times are Redis server time in milliseconds (``TIME``), so nodes on different hosts agree.
"""

from __future__ import annotations

# Shared helpers, prepended to the scripts that use them.
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function decr(key, field)
  if redis.call('HINCRBY', key, field, -1) <= 0 then redis.call('HDEL', key, field) end
end
local function extend(key, ms)
  -- Lengthen a key's TTL, never shorten it: processes with a longer group_expiry win.
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local function drop_expired(queue, now)
  -- Items are "<expire ms>:<payload>" in send order, so expired ones sit at the head.
  for _ = 1, 1000 do
    local head = redis.call('LINDEX', queue, 0)
    if not head then return end
    local exp = tonumber(string.match(head, '^(%d+):'))
    if exp and exp > now then return end
    redis.call('LPOP', queue)
  end
end
"""

# SEND_QUEUE: append one message to a normal channel's queue, unless it is at capacity.
# KEYS[1] queue list (P:q:<channel>)
# ARGV[1] payload, ARGV[2] capacity, ARGV[3] expiry ms
# Returns 1 when queued, 0 when the channel is full (the caller raises ChannelFull).
SEND_QUEUE = (
    _PRELUDE
    + """
local now = now_ms()
drop_expired(KEYS[1], now)
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('RPUSH', KEYS[1], (now + tonumber(ARGV[3])) .. ':' .. ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 1000)
return 1
"""
)

# SEND_INBOX: append a message for one process-local channel to its node's inbox stream.
# KEYS[1] inbox stream (P:in:<token>), KEYS[2] the node's full set (P:full:<token>)
# ARGV[1] channel, ARGV[2] payload, ARGV[3] inbox max length (approximate), ARGV[4] inbox TTL ms
# Returns 1 when appended, 0 when the owning node marked the channel full.
SEND_INBOX = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'c', ARGV[1], 'm', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# GROUP_SEND: one message to every node with members of a group (one inbox entry per node;
# the node fans out locally), and to every normal-channel member's queue.
# KEYS[1] P:gn:<group> (or P:gp:<group> for presence-only sends), KEYS[2] P:gq:<group>,
# KEYS[3] P:g:<group>
# ARGV[1] prefix, ARGV[2] entry kind: 'g' (all members) or 'p' (presence members only),
# ARGV[3] group, ARGV[4] payload, ARGV[5] channel to exclude ('' for none),
# ARGV[6] inbox max length, ARGV[7] unused, ARGV[8] expiry ms, ARGV[9] group_expiry ms,
# ARGV[10] default capacity (P:qc holds each normal member's own capacity)
# Returns {nodes written, queues written, queue messages dropped for capacity}.
GROUP_SEND = (
    _PRELUDE
    + """
local prefix, kind, group, payload, exclude = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tokens = redis.call('HKEYS', KEYS[1])
for _, token in ipairs(tokens) do
  local inbox = prefix .. ':in:' .. token
  -- No PEXPIRE here: a listed node keeps its own inbox's TTL fresh (HEARTBEAT), and
  -- pruning deletes the inbox together with the node's entries in these hashes.
  if exclude == '' then
    redis.call('XADD', inbox, 'MAXLEN', '~', ARGV[6], '*', kind, group, 'm', payload)
  else
    redis.call('XADD', inbox, 'MAXLEN', '~', ARGV[6], '*', kind, group, 'm', payload, 'x', exclude)
  end
end
local queued, dropped = 0, 0
if kind == 'g' and redis.call('EXISTS', KEYS[2]) == 1 then
  local now = now_ms()
  local expiry = tonumber(ARGV[8])
  local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[9]))
  for _, channel in ipairs(stale) do
    redis.call('ZREM', KEYS[2], channel)
    redis.call('HDEL', KEYS[3], channel)
    redis.call('SREM', prefix .. ':cg:' .. channel, group)
  end
  for _, channel in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if channel ~= exclude then
      local capacity = tonumber(redis.call('HGET', prefix .. ':qc', channel) or ARGV[10])
      local queue = prefix .. ':q:' .. channel
      drop_expired(queue, now)
      if redis.call('LLEN', queue) >= capacity then
        dropped = dropped + 1
      else
        redis.call('RPUSH', queue, (now + expiry) .. ':' .. payload)
        redis.call('PEXPIRE', queue, expiry + 1000)
        queued = queued + 1
      end
    end
  end
end
return {#tokens, queued, dropped}
"""
)

# Membership helpers shared by GROUP_ADD and REREGISTER.
_MEMBERSHIP = """
local function add_member(prefix, group, channel, token, record, presence, gexp, capacity)
  local g, gn, gp = prefix .. ':g:' .. group, prefix .. ':gn:' .. group, prefix .. ':gp:' .. group
  local gpm, gq = prefix .. ':gpm:' .. group, prefix .. ':gq:' .. group
  local cg = prefix .. ':cg:' .. channel
  if string.sub(record, 1, 1) == ':' then record = now_ms() .. record end
  local old = redis.call('HGET', g, channel)
  local old_presence = redis.call('HGET', gpm, channel)
  redis.call('HSET', g, channel, record)
  if token == '' then
    redis.call('ZADD', gq, now_ms(), channel)
    extend(gq, gexp)
    redis.call('HSET', prefix .. ':qc', channel, capacity)
    extend(prefix .. ':qc', gexp)
  elseif not old then
    redis.call('HINCRBY', gn, token, 1)
  end
  if presence == '1' then
    redis.call('HSET', gpm, channel, record)
    if not old_presence and token ~= '' then redis.call('HINCRBY', gp, token, 1) end
    extend(gpm, gexp)
    extend(gp, gexp)
  elseif old_presence then
    redis.call('HDEL', gpm, channel)
    if token ~= '' then decr(gp, token) end
  end
  redis.call('SADD', cg, group)
  extend(cg, gexp)
  if token ~= '' then
    local nc = prefix .. ':nc:' .. token
    redis.call('SADD', nc, channel)
    extend(nc, gexp)
    extend(gn, gexp)
  end
  extend(g, gexp)
  return old, old_presence, record
end
"""

# GROUP_ADD: add (or update) one membership; for presence members, also read the presence state.
# When another process adds a node's channel, it also tells that node through its inbox.
# KEYS[1..7] P:g, P:gn, P:gp, P:gpm, P:gq of the group, P:cg:<channel>, P:nc:<token>
#   (declared for documentation and Cluster slot checks; the helper rebuilds them from ARGV[1])
# ARGV[1] prefix, ARGV[2] group, ARGV[3] channel, ARGV[4] owning node token ('' for a normal
# channel), ARGV[5] member record ':<msgpack [node_id, meta]>' (stamped here with the join
# time), ARGV[6] presence '1'/'0', ARGV[7] group_expiry ms, ARGV[8] '1' to notify the owning
# node's inbox, ARGV[9] inbox max length, ARGV[10] inbox TTL ms, ARGV[11] the channel's
# capacity (kept in P:qc for normal channels, so GROUP_SEND can enforce it server-side)
# Returns {old record or false, old presence record or false, stored record, presence state
# as a flat channel/record list (only when ARGV[6] is '1')}.
GROUP_ADD = (
    _PRELUDE
    + _MEMBERSHIP
    + """
local prefix, group, channel, token, presence = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[6]
local old, old_presence, record = add_member(prefix, group, channel, token, ARGV[5], presence, tonumber(ARGV[7]), ARGV[11])
if ARGV[8] == '1' then
  local inbox = prefix .. ':in:' .. token
  redis.call('XADD', inbox, 'MAXLEN', '~', ARGV[9], '*', 'o', 'a', 'g', group, 'c', channel, 'r', record, 'p', presence)
  redis.call('PEXPIRE', inbox, ARGV[10])
end
local state = {}
if presence == '1' then state = redis.call('HGETALL', KEYS[4]) end
return {old or false, old_presence or false, record, state}
"""
)

# REREGISTER: re-add a batch of memberships a node holds in memory (after it was pruned while
# alive, or after Redis lost its data). Same effect as GROUP_ADD for each.
# KEYS none. ARGV[1] prefix, ARGV[2] node token, ARGV[3] group_expiry ms, then groups of four:
# group, channel, record, presence ('1'/'0').
# Returns a flat list group, channel, record for each presence membership that was missing
# (the caller announces those joins only when the node had been pruned).
REREGISTER = (
    _PRELUDE
    + _MEMBERSHIP
    + """
local added = {}
local gexp = tonumber(ARGV[3])
for i = 4, #ARGV, 4 do
  local _, old_presence, record = add_member(ARGV[1], ARGV[i], ARGV[i + 1], ARGV[2], ARGV[i + 2], ARGV[i + 3], gexp, 0)
  if ARGV[i + 3] == '1' and not old_presence then
    table.insert(added, ARGV[i]); table.insert(added, ARGV[i + 1]); table.insert(added, record)
  end
end
return added
"""
)

# GROUP_DISCARD: remove one membership; does nothing if it is not there.
# KEYS[1..7] as GROUP_ADD. ARGV[1] group, ARGV[2] channel, ARGV[3] owning node token ('' normal),
# ARGV[4] '1' to tell the owning node through its inbox, ARGV[5] inbox max length,
# ARGV[6] inbox TTL ms, ARGV[7] prefix
# Returns {1 if removed else 0, the presence record if it was a presence member else false}.
GROUP_DISCARD = (
    _PRELUDE
    + """
local group, channel, token = ARGV[1], ARGV[2], ARGV[3]
if ARGV[4] == '1' then
  local inbox = ARGV[7] .. ':in:' .. token
  redis.call('XADD', inbox, 'MAXLEN', '~', ARGV[5], '*', 'o', 'd', 'g', group, 'c', channel)
  redis.call('PEXPIRE', inbox, ARGV[6])
end
if redis.call('HDEL', KEYS[1], channel) == 0 then return {0, false} end
if token == '' then redis.call('ZREM', KEYS[5], channel) else decr(KEYS[2], token) end
local presence = redis.call('HGET', KEYS[4], channel)
if presence then
  redis.call('HDEL', KEYS[4], channel)
  if token ~= '' then decr(KEYS[3], token) end
end
redis.call('SREM', KEYS[6], group)
if token ~= '' and redis.call('SCARD', KEYS[6]) == 0 then redis.call('SREM', KEYS[7], channel) end
return {1, presence or false}
"""
)

# HEARTBEAT: record that a node is alive, and report what it needs to know.
# KEYS[1] P:nodes (token -> deadline ms), KEYS[2] P:ni, KEYS[3] P:nid, KEYS[4] P:tid, KEYS[5] P:pruned:<token>,
# KEYS[6] P:flush, KEYS[7] the node's inbox (P:in:<token>)
# ARGV[1] token, ARGV[2] node id, ARGV[3] node info (msgpack), ARGV[4] node_timeout ms,
# ARGV[5] '1' on first registration (refuse a node id held by another live process),
# ARGV[6] inbox TTL ms (refreshed here, so sends need not)
# Returns {-1, other token} when the id is taken; else {existed 1/0, was pruned 1/0,
# now ms, flush epoch or '', dead tokens (at most 16 per beat)}.
HEARTBEAT = (
    _PRELUDE
    + """
local token, node_id = ARGV[1], ARGV[2]
local now = now_ms()
-- Each node's score is its own deadline (last beat + its own node_timeout), so nodes with
-- different timeouts (a rolling configuration change) judge each other by the right one.
local deadline = now + tonumber(ARGV[4])
if ARGV[5] == '1' then
  local other = redis.call('HGET', KEYS[3], node_id)
  if other and other ~= token then
    local other_deadline = redis.call('ZSCORE', KEYS[1], other)
    if other_deadline and tonumber(other_deadline) >= now then return {-1, other} end
  end
end
local existed = redis.call('ZSCORE', KEYS[1], token) and 1 or 0
local pruned = redis.call('EXISTS', KEYS[5])
redis.call('ZADD', KEYS[1], deadline, token)
redis.call('HSET', KEYS[2], token, ARGV[3])
redis.call('HSET', KEYS[3], node_id, token)
redis.call('HSET', KEYS[4], token, node_id)
if pruned == 1 then redis.call('DEL', KEYS[5]) end
redis.call('PEXPIRE', KEYS[7], ARGV[6])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 16)
return {existed, pruned, now, redis.call('GET', KEYS[6]) or '', dead}
"""
)

# PRUNE_NODE: remove a dead node and every membership of its channels, atomically, once.
# KEYS[1] P:nodes, KEYS[2] P:ni, KEYS[3] P:nid, KEYS[4] P:tid
# ARGV[1] prefix, ARGV[2] token, ARGV[3] unused (the deadline is in P:nodes), ARGV[4] tombstone TTL ms,
# ARGV[5] '1' when a node removes itself on a clean stop (no liveness check, no tombstone)
# Returns {0} when there was nothing to prune (already pruned, or it beat again meanwhile);
# else {1, then group, channel, record for each presence membership removed}.
PRUNE_NODE = (
    _PRELUDE
    + """
local prefix, token, own = ARGV[1], ARGV[2], ARGV[5] == '1'
local seen = redis.call('ZSCORE', KEYS[1], token)
if not own then
  if not seen then return {0} end
  if tonumber(seen) >= now_ms() then return {0} end  -- its deadline has not passed
end
local result = {1}
local nc = prefix .. ':nc:' .. token
for _, channel in ipairs(redis.call('SMEMBERS', nc)) do
  local cg = prefix .. ':cg:' .. channel
  for _, group in ipairs(redis.call('SMEMBERS', cg)) do
    if redis.call('HDEL', prefix .. ':g:' .. group, channel) == 1 then
      decr(prefix .. ':gn:' .. group, token)
      local gpm = prefix .. ':gpm:' .. group
      local record = redis.call('HGET', gpm, channel)
      if record then
        redis.call('HDEL', gpm, channel)
        decr(prefix .. ':gp:' .. group, token)
        table.insert(result, group); table.insert(result, channel); table.insert(result, record)
      end
    end
  end
  redis.call('DEL', cg)
end
redis.call('DEL', nc, prefix .. ':in:' .. token, prefix .. ':full:' .. token)
redis.call('ZREM', KEYS[1], token)
redis.call('HDEL', KEYS[2], token)
local node_id = redis.call('HGET', KEYS[4], token)
if node_id then
  if redis.call('HGET', KEYS[3], node_id) == token then redis.call('HDEL', KEYS[3], node_id) end
  redis.call('HDEL', KEYS[4], token)
end
if not own then redis.call('SET', prefix .. ':pruned:' .. token, '1', 'PX', ARGV[4]) end
return result
"""
)

# RESTORE_INFLIGHT: give back what a cancelled or failed receive had moved out of a queue.
# KEYS[1] the receiver's in-flight list, KEYS[2] the queue (P:q:<channel>)
# ARGV[1] the item already delivered locally (skipped once), or '' for none
# Returns the number of items put back at the head of the queue, in their original order.
RESTORE_INFLIGHT = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
local skipped, restored = false, 0
for i = #items, 1, -1 do
  if not skipped and ARGV[1] ~= '' and items[i] == ARGV[1] then
    skipped = true
  else
    redis.call('LPUSH', KEYS[2], items[i])
    restored = restored + 1
  end
end
return restored
"""

# TAKE_TOKENS: a token bucket shared by every process (for example a per-user rate limit that
# holds across nodes). Tokens refill continuously at ARGV[1] per second up to ARGV[2].
# KEYS[1] the bucket (P:rl:<key>, a hash of tokens and the last refill time)
# ARGV[1] rate (tokens per second), ARGV[2] burst (bucket size), ARGV[3] cost
# Returns 1 when the cost was taken, 0 when the bucket holds too few tokens (nothing taken).
TAKE_TOKENS = (
    _PRELUDE
    + """
local now = now_ms()
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local saved = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens, at = tonumber(saved[1]), tonumber(saved[2])
if tokens == nil or at == nil then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local taken = 0
if tokens >= cost then tokens = tokens - cost; taken = 1 end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', now)
-- Once refilled the bucket carries no information: let it go.
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return taken
"""
)

# NODES: the node table and the server time, for nodes() in one round trip.
# KEYS[1] P:nodes, KEYS[2] P:ni
# Returns {now ms, flat token/last-seen list, flat token/info list}.
NODES = (
    _PRELUDE
    + """
return {now_ms(), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), redis.call('HGETALL', KEYS[2])}
"""
)

ALL = {
    "send_queue": SEND_QUEUE,
    "send_inbox": SEND_INBOX,
    "group_send": GROUP_SEND,
    "group_add": GROUP_ADD,
    "reregister": REREGISTER,
    "group_discard": GROUP_DISCARD,
    "heartbeat": HEARTBEAT,
    "prune_node": PRUNE_NODE,
    "nodes": NODES,
    "restore_inflight": RESTORE_INFLIGHT,
    "take_tokens": TAKE_TOKENS,
}
