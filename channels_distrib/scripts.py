"""Every Lua script the layer runs, each documented with its KEYS, ARGV and return value.

The key layout is in :mod:`channels_distrib.keys`. Every key a script touches that the caller
can name is passed in KEYS. Three scripts must also reach keys named by data they read (a
group's nodes' inboxes, its normal members' queues, a dead node's groups, a batch of a node's
groups); they build those names with the helpers in :data:`LUA_KEYS`, which mirror
:class:`~channels_distrib.keys.Keys`. That is fine on a standalone server or a Sentinel
master; Redis Cluster splits them into a read and pipelined writes instead (DESIGN.md).

Times are Redis server time in milliseconds (``TIME``), so nodes on different hosts agree.
Writes to inboxes use ``XADD ... NOMKSTREAM``: only a live node's heartbeat creates its inbox,
so no send ever re-creates the inbox of a pruned node.

The doorbell: a reader that found its inbox empty arms itself (ARM_INBOX sets the node's
``armed`` key) and waits on the node's bell channel instead of in ``XREAD BLOCK``. Every
script that appends a message or control entry to an inbox does so through :data:`_BELL`'s
``append``: when ``armed`` is set it deletes it and publishes the entry on the bell (``PUBLISH``
on a standalone server or Sentinel master, ``SPUBLISH`` on a cluster: the bell shares the
inbox's hash tag, so it is a shard channel of the inbox's slot). So a bell is rung once per
wait, and never while the reader keeps finding entries (it does not arm then); a reader
that has read everything before the entry takes it from the bell, without a read. The readers'
bells are written to them after the script's own reply, where an XADD unblocking an
``XREAD BLOCK`` had them written first (so the sender waited for the woken nodes' CPU).
In the fan-out (GROUP_SEND, ROOM_SEND) the ``armed`` key and the bell channel of each
node are built in Lua (``nkey``), as its inbox name is. The heartbeats' inbox markers (``o``
``n``) ring nothing (the reader skips them anyway); a bell rung after one is only a wake-up,
since the entry before the bell's is the marker, which the reader has not read.
"""

from __future__ import annotations

#: Key names built inside Lua (see keys.py for the layout these mirror).
LUA_KEYS = """
local function gkey(prefix, group, suffix) return prefix .. ':{g.' .. group .. '}:' .. suffix end
local function ckey(prefix, channel, suffix) return prefix .. ':{c.' .. channel .. '}:' .. suffix end
local function nkey(prefix, token, suffix) return prefix .. ':{n.' .. token .. '}:' .. suffix end
local function group_keys(prefix, group)
  return {gkey(prefix, group, 'm'), gkey(prefix, group, 'n'), gkey(prefix, group, 'p'),
          gkey(prefix, group, 'pm'), gkey(prefix, group, 'q'), gkey(prefix, group, 'qc')}
end
"""

# Shared helpers, prepended to the scripts that use them.
_PRELUDE = (
    LUA_KEYS
    + """
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
local function live(nodes, token)
  local deadline = redis.call('ZSCORE', nodes, token)
  return deadline and tonumber(deadline) >= now_ms()
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
)

# Every append to an inbox, with its doorbell (see the module docstring): XADD NOMKSTREAM
# MAXLEN ~ `maxlen` of `fields` (a flat list; a pruned node's inbox stays gone), then, when
# the reader is armed, the mark deleted and the bell rung with msgpack [prev, id, fields]:
# the entry, and the id of the entry before it in the stream ('' for none). A reader whose
# cursor is `prev` takes the entry from the bell and saves a read (nothing lies between).
# `publish` is 'PUBLISH', or 'SPUBLISH' on a cluster. Returns the entry id, or false when
# the node has no inbox.
_BELL = """
local function append(inbox, armed, bell, publish, maxlen, fields)
  local prev = nil
  if redis.call('EXISTS', armed) == 1 then
    local last = redis.call('XREVRANGE', inbox, '+', '-', 'COUNT', 1)[1]
    prev = last and last[1] or ''
  end
  local id = redis.call('XADD', inbox, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '*', unpack(fields))
  if id and prev then
    redis.call('DEL', armed)
    -- pcall: the entry is written already; a bell refused (an ACL user allowed to append
    -- but not to publish) must not fail the send after its write. The reader's wait is
    -- bounded (BLOCK_SECONDS), so the entry is read all the same.
    redis.pcall(publish, bell, cmsgpack.pack({prev, id, fields}))
  end
  return id
end
"""

# A node's channel -> groups index is a hash whose values are space-separated group names
# (group names hold no spaces): one field per channel instead of one set per channel.
_WORDS = """
local function add_word(key, field, word)
  local words = redis.call('HGET', key, field)
  if not words then
    redis.call('HSET', key, field, word)
  elseif not string.find(' ' .. words .. ' ', ' ' .. word .. ' ', 1, true) then
    redis.call('HSET', key, field, words .. ' ' .. word)
  end
end
local function remove_word(key, field, word)
  local words = redis.call('HGET', key, field)
  if not words then return end
  local kept = {}
  for w in string.gmatch(words, '%S+') do if w ~= word then table.insert(kept, w) end end
  if #kept == 0 then redis.call('HDEL', key, field)
  else redis.call('HSET', key, field, table.concat(kept, ' ')) end
end
"""

# Membership helpers shared by GROUP_ADD, GROUP_DISCARD, SYNC, GROUP_SEND and PRUNE_NODE.
# `g` is the group's six keys (m, n, p, pm, q, qc); `side` is the channel's own index: the
# node's channel hash (P:{n.<token>}:c) for a node's channel, the channel's group set
# (P:{c.<channel>}:g) for a normal channel.
_MEMBERSHIP = (
    _WORDS
    + """
local function add_member(g, side, group, channel, token, record, presence, gexp, capacity, node_ttl)
  if string.sub(record, 1, 1) == ':' then record = now_ms() .. record end
  local old = redis.call('HGET', g[1], channel)
  local old_presence = redis.call('HGET', g[4], channel)
  redis.call('HSET', g[1], channel, record)
  if token == '' then
    redis.call('ZADD', g[5], now_ms(), channel)
    redis.call('HSET', g[6], channel, capacity)
    if side then redis.call('SADD', side, group); extend(side, gexp) end
    extend(g[5], gexp); extend(g[6], gexp)
  else
    if not old then redis.call('HINCRBY', g[2], token, 1) end
    if side then add_word(side, channel, group); extend(side, node_ttl) end
    extend(g[2], gexp)
  end
  if presence == '1' then
    redis.call('HSET', g[4], channel, record)
    if not old_presence and token ~= '' then redis.call('HINCRBY', g[3], token, 1) end
    extend(g[4], gexp); extend(g[3], gexp)
  elseif old_presence then
    redis.call('HDEL', g[4], channel)
    if token ~= '' then decr(g[3], token) end
  end
  extend(g[1], gexp)
  return old, old_presence, record
end
local function remove_member(g, side, group, channel, token)
  -- The channel's own index is cleaned even when the group hash had no entry (self-healing).
  -- `side` is false on Redis Cluster, where the index lives in another slot (CLUSTER_*).
  if not side then
  elseif token == '' then
    redis.call('SREM', side, group)
  else
    remove_word(side, channel, group)
  end
  if redis.call('HDEL', g[1], channel) == 0 then return false, false end
  if token == '' then
    redis.call('ZREM', g[5], channel)
    redis.call('HDEL', g[6], channel)
  else
    decr(g[2], token)
  end
  local presence = redis.call('HGET', g[4], channel)
  if presence then
    redis.call('HDEL', g[4], channel)
    if token ~= '' then decr(g[3], token) end
  end
  return true, presence or false
end
"""
)

# SEND_QUEUE: append one message to a normal channel's queue, unless it is at capacity.
# KEYS[1] queue list (P:{c.<channel>}:q)
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
# KEYS[1] inbox stream (P:{n.<token>}:in), KEYS[2] the node's full set (P:{n.<token>}:full),
# KEYS[3] the node's armed mark (P:{n.<token>}:armed)
# ARGV[1] channel, ARGV[2] payload, ARGV[3] inbox max length (approximate), ARGV[4] the
# node's bell channel (P:{n.<token>}:bell), ARGV[5] 'PUBLISH' or 'SPUBLISH' (cluster)
# Returns 1 when appended, 0 when the owning node marked the channel full, 2 when the node
# has no inbox (it is not live: the message goes nowhere, as to any channel nobody reads).
SEND_INBOX = (
    _BELL
    + """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
if not append(KEYS[1], KEYS[3], ARGV[4], ARGV[5], ARGV[3], {'c', ARGV[1], 'm', ARGV[2]}) then return 2 end
return 1
"""
)

# ARM_INBOX: the inbox reader's read, while it has a bell, when it is about to go idle (a
# plain XREAD found nothing, or it just woke): the entries after its cursor, and when there
# are none, the armed mark (with a TTL, so a reader that died stops costing writers a
# PUBLISH), atomically: an entry appended after this script rings the bell. Not the read
# under load: its entries pass through Lua tables, several times an XREAD's CPU.
# KEYS[1] inbox stream, KEYS[2] the node's armed mark
# ARGV[1] the reader's cursor (last id read), ARGV[2] most entries to return, ARGV[3] TTL of
# the mark, ms
# Returns the entries as XRANGE does ({id, {field, value, ...}} each); empty when it armed.
ARM_INBOX = """
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
if #entries == 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) end
return entries
"""

# CLUSTER_APPEND: the cluster fan-out's append of one group message to one node's inbox
# (pipelined per master after CLUSTER_FAN_READ), ringing its bell.
# KEYS[1] inbox stream, KEYS[2] the node's armed mark
# ARGV[1] the node's bell channel, ARGV[2] inbox max length, ARGV[3..] the entry's fields
# and values
# Returns the entry id, or false when the node has no inbox (not live).
CLUSTER_APPEND = (
    _BELL
    + """
return append(KEYS[1], KEYS[2], ARGV[1], 'SPUBLISH', ARGV[2], {unpack(ARGV, 3)})
"""
)

# The fan-out of GROUP_SEND and ROOM_SEND: one inbox entry per node with members of the
# group (the node fans out locally), one list item per normal-channel member. `k` is the
# group's keys {nodes (n, or p for presence-only sends), q, m, qc, pm}; `a` the arguments
# {prefix, kind, group, payload, exclude, inbox max length, expiry ms, group_expiry ms,
# default capacity}; `offset` is the room history offset (ROOM_SEND) or nil: it travels as
# the inbox entry's 'h' field, and the receiving node adds it to the message.
_FANOUT = """
local function fan_out(k, a, offset)
  local prefix, kind, group, payload, exclude = a[1], a[2], a[3], a[4], a[5]
  local entry = {kind, group, 'm', payload}
  if exclude ~= '' then table.insert(entry, 'x'); table.insert(entry, exclude) end
  if offset then table.insert(entry, 'h'); table.insert(entry, offset) end
  local written = 0
  for _, token in ipairs(redis.call('HKEYS', k[1])) do
    -- NOMKSTREAM: a pruned node's inbox stays gone (its heartbeat re-creates it on return).
    local inbox = nkey(prefix, token, 'in')
    if append(inbox, nkey(prefix, token, 'armed'), nkey(prefix, token, 'bell'), 'PUBLISH', a[6], entry) then
      written = written + 1
    end
  end
  local queued, dropped = 0, 0
  -- Normal-channel members: all of them for a group send, the presence members ('pm') for
  -- a presence-only send (their diffs go through their queues like everything else).
  if redis.call('EXISTS', k[2]) == 1 then
    local now = now_ms()
    local expiry = tonumber(a[7])
    local g = {k[3], '', '', k[5], k[2], k[4]}
    for _, channel in ipairs(redis.call('ZRANGEBYSCORE', k[2], '-inf', now - tonumber(a[8]))) do
      remove_member(g, ckey(prefix, channel, 'g'), group, channel, '')
    end
    for _, channel in ipairs(redis.call('ZRANGE', k[2], 0, -1)) do
      if channel ~= exclude and (kind == 'g' or redis.call('HEXISTS', k[5], channel) == 1) then
        local capacity = tonumber(redis.call('HGET', k[4], channel) or a[9])
        local queue = ckey(prefix, channel, 'q')
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
  return written, queued, dropped
end
"""

# GROUP_SEND: one message to every node with members of a group (one inbox entry per node;
# the node fans out locally), and to every normal-channel member's queue.
# KEYS[1] P:{g.<group>}:n (or :p for presence-only sends), KEYS[2] :q, KEYS[3] :m,
# KEYS[4] :qc, KEYS[5] :pm of the group
# ARGV[1] prefix, ARGV[2] entry kind: 'g' (all members) or 'p' (presence members only),
# ARGV[3] group, ARGV[4] payload, ARGV[5] channel to exclude ('' for none),
# ARGV[6] inbox max length, ARGV[7] expiry ms, ARGV[8] group_expiry ms, ARGV[9] default capacity
# Returns {nodes written, queues written, queue messages dropped for capacity}.
GROUP_SEND = (
    _PRELUDE
    + _MEMBERSHIP
    + _BELL
    + _FANOUT
    + """
local written, queued, dropped = fan_out(KEYS, ARGV, nil)
return {written, queued, dropped}
"""
)

# Room history (history.py): a stream per room, P:{g.<room>}:h, ids assigned by XADD '*' (so
# trimming by age is by id), entries 'm' payload, 'x' the excluded channel ('' for none),
# 'p' the id of the entry added before it ('0-0' for the first ever: a since at or after
# the first kept entry's 'p' is complete), 'c' the room's byte count before it; and its
# settings and bookkeeping, the hash P:{g.<room>}:hc: n (most entries kept), ttl (ms), b
# (most bytes kept), e (epoch: drawn when the hash is made, so a history lost with its
# hash is told from a live one), l (id of the newest entry), cum (bytes ever added: the
# sum of 'm' and 'x' lengths; kept bytes = cum - the first kept entry's 'c').
# An offset is '<epoch>:<ms>-<seq, 6 digits>': it grows within one epoch.
_HISTORY = """
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function id_before(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end
local function offset_of(epoch, id)
  local _, seq = id_parts(id)
  return epoch .. ':' .. string.match(id, '^(%d+)') .. '-' .. string.format('%06d', seq)
end
local function hist_first(h)
  -- The oldest kept entry: its id and its fields as a table, or nil.
  local e = redis.call('XRANGE', h, '-', '+', 'COUNT', 1)[1]
  if not e then return nil, nil end
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  return e[1], f
end
local function hist_trim(h, cum, ttl_ms, now, max_bytes)
  -- Drop entries older than ttl, then the oldest while over max_bytes; returns the oldest
  -- kept entry (id, fields) or nil. (The count bound is XADD's MAXLEN.)
  redis.call('XTRIM', h, 'MINID', now - ttl_ms)
  for _ = 1, 100000 do
    local id, f = hist_first(h)
    if not id or cum - tonumber(f['c']) <= max_bytes then return id, f end
    redis.call('XDEL', h, id)
  end
  return nil, nil
end
local function hist_append(h, hc, payload, exclude, gexp)
  -- Returns the new entry's offset, or nil when the room keeps no history.
  local conf = redis.call('HMGET', hc, 'n', 'ttl', 'b', 'e', 'l', 'cum')
  if not conf[4] then return nil end
  local cum = tonumber(conf[6] or '0')
  local id = redis.call('XADD', h, 'MAXLEN', conf[1], '*', 'm', payload, 'x', exclude, 'p', conf[5] or '0-0', 'c', cum)
  cum = cum + #payload + #exclude
  redis.call('HSET', hc, 'l', id, 'cum', cum)
  hist_trim(h, cum, tonumber(conf[2]), id_parts(id), tonumber(conf[3]))
  redis.call('PEXPIRE', h, conf[2])
  extend(hc, gexp)
  return offset_of(conf[4], id)
end
"""

# ROOM_SEND: GROUP_SEND for a room send (broadcast_to_room, api.send_to_room): when the
# room keeps history, the message is first appended to it, and its offset travels with
# every inbox entry; so one script gives the room one order, and the offset a client sees
# is the one stored.
# KEYS[1..5] as GROUP_SEND (kind 'g'); KEYS[6] P:{g.<room>}:h, KEYS[7] P:{g.<room>}:hc
# ARGV[1..9] as GROUP_SEND
# Returns {nodes written, queues written, queue messages dropped, offset or false}.
ROOM_SEND = (
    _PRELUDE
    + _MEMBERSHIP
    + _BELL
    + _FANOUT
    + _HISTORY
    + """
local offset = hist_append(KEYS[6], KEYS[7], ARGV[4], ARGV[5], tonumber(ARGV[8]))
local written, queued, dropped = fan_out(KEYS, ARGV, offset)
return {written, queued, dropped, offset or false}
"""
)

# HISTORY_APPEND: ROOM_SEND's history step alone, for the broker path (RabbitMQ carries the
# message; Redis keeps the history and numbers it).
# KEYS[1] P:{g.<room>}:h, KEYS[2] P:{g.<room>}:hc
# ARGV[1] payload, ARGV[2] channel to exclude ('' for none), ARGV[3] group_expiry ms
# Returns the message's offset, or false when the room keeps no history.
HISTORY_APPEND = (
    _PRELUDE
    + _HISTORY
    + """
return hist_append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3])) or false
"""
)

# HISTORY_CONFIGURE: make a room keep history (a connection of a class with history joins
# it). Each setting only grows (the larger value wins); the epoch is drawn once, when the
# settings hash is created.
# KEYS[1] P:{g.<room>}:hc
# ARGV[1] most entries, ARGV[2] ttl ms, ARGV[3] most bytes, ARGV[4] a fresh epoch (used
# only when the room has none), ARGV[5] how long the settings outlive the last join or
# send, ms (group_expiry)
# Returns the room's epoch.
HISTORY_CONFIGURE = (
    _PRELUDE
    + """
redis.call('HSETNX', KEYS[1], 'e', ARGV[4])
local names = {'n', 'ttl', 'b'}
for i = 1, 3 do
  local current = tonumber(redis.call('HGET', KEYS[1], names[i]) or '0')
  if current < tonumber(ARGV[i]) then redis.call('HSET', KEYS[1], names[i], ARGV[i]) end
end
extend(KEYS[1], tonumber(ARGV[5]))
return redis.call('HGET', KEYS[1], 'e')
"""
)

# HISTORY_READ: what a room's history holds after an offset (or its newest entries).
# KEYS[1] P:{g.<room>}:h, KEYS[2] P:{g.<room>}:hc
# ARGV[1] the epoch of the offset ('' for the newest entries), ARGV[2] its stream id,
# ARGV[3] most entries to return (0: as many as the room keeps)
# Returns {1, epoch, newest offset or false, flat offset/payload/excluded triples} when the
# history is complete after the offset (or no offset was given); {0} when it is not: no
# history, another epoch (lost, or another room's), entries after it already removed, or
# an offset newer than any given.
HISTORY_READ = (
    _PRELUDE
    + _HISTORY
    + """
local conf = redis.call('HMGET', KEYS[2], 'n', 'ttl', 'b', 'e', 'l', 'cum')
local epoch, last = conf[4], conf[5]
if not epoch then return {0} end
if ARGV[1] ~= '' and ARGV[1] ~= epoch then return {0} end
local first, fields = hist_trim(KEYS[1], tonumber(conf[6] or '0'), tonumber(conf[2]), now_ms(), tonumber(conf[3]))
local limit = tonumber(ARGV[3])
if limit <= 0 then limit = tonumber(conf[1]) end
local entries
if ARGV[1] == '' then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)
  local n = #entries
  for i = 1, math.floor(n / 2) do entries[i], entries[n + 1 - i] = entries[n + 1 - i], entries[i] end
else
  local since = ARGV[2]
  if not last or id_before(last, since) then return {0} end
  -- Complete after since when nothing after it was removed: since is at or after the
  -- entry before the oldest kept one (with nothing kept: since is the newest).
  local floor = first and fields['p'] or last
  if id_before(since, floor) then return {0} end
  entries = redis.call('XRANGE', KEYS[1], '(' .. since, '+', 'COUNT', limit)
end
local flat = {}
for _, e in ipairs(entries) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  table.insert(flat, offset_of(epoch, e[1])); table.insert(flat, f['m'] or ''); table.insert(flat, f['x'] or '')
end
return {1, epoch, last and offset_of(epoch, last) or false, flat}
"""
)

# HISTORY_INFO: how much a room's history holds (memory per room).
# KEYS[1] P:{g.<room>}:h, KEYS[2] P:{g.<room>}:hc
# Returns {entries, bytes kept (payloads and excluded names), MEMORY USAGE of the stream or
# 0, settings n, ttl ms, b, epoch} or {} when the room keeps no history.
HISTORY_INFO = (
    _PRELUDE
    + _HISTORY
    + """
local conf = redis.call('HMGET', KEYS[2], 'n', 'ttl', 'b', 'e', 'l', 'cum')
if not conf[4] then return {} end
local cum = tonumber(conf[6] or '0')
local first, fields = hist_trim(KEYS[1], cum, tonumber(conf[2]), now_ms(), tonumber(conf[3]))
local kept = first and (cum - tonumber(fields['c'])) or 0
local memory = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', 0) or 0
return {redis.call('XLEN', KEYS[1]), kept, memory, tonumber(conf[1]), tonumber(conf[2]),
        tonumber(conf[3]), conf[4]}
"""
)

# GROUP_ADD: add (or update) one membership; for presence members, also read the presence
# state. A process-local channel is recorded only while its node is live (a stale name, or
# a name with '!' that no live node issued, is refused); when another process adds a node's
# channel, the node is told through its inbox.
# KEYS[1..6] the group's m, n, p, pm, q, qc; KEYS[7] the channel's index (P:{n.<token>}:c or
# P:{c.<channel>}:g); KEYS[8] P:{x}:nodes; KEYS[9] the owning node's inbox (or KEYS[7])
# ARGV[1] group, ARGV[2] channel, ARGV[3] owning node token ('' for a normal channel),
# ARGV[4] member record ':<msgpack [node_id, meta]>' (stamped here with the join time),
# ARGV[5] presence '1'/'0', ARGV[6] group_expiry ms, ARGV[7] '1' to notify the owning node,
# ARGV[8] inbox max length, ARGV[9] the channel's capacity (normal channels), ARGV[10] node
# key TTL ms, ARGV[11] '0' to skip reading the presence state (the caller's node keeps a
# replica of it; '1': read it), ARGV[12] the owning node's bell channel ('' for a normal
# channel); KEYS[10] the owning node's armed mark (or KEYS[7])
# Returns {0} when refused (the channel's node is not live); else {1, old record or false,
# old presence record or false, stored record, presence state as a flat channel/record list
# (only when ARGV[5] is '1' and ARGV[11] is not '0')}.
GROUP_ADD = (
    _PRELUDE
    + _MEMBERSHIP
    + _BELL
    + """
local group, channel, token, presence = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
if token ~= '' and not live(KEYS[8], token) then return {0} end
local g = {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local old, old_presence, record = add_member(g, KEYS[7], group, channel, token, ARGV[4], presence, tonumber(ARGV[6]), ARGV[9], tonumber(ARGV[10]))
if ARGV[7] == '1' then
  append(KEYS[9], KEYS[10], ARGV[12], 'PUBLISH', ARGV[8], {'o', 'a', 'g', group, 'c', channel, 'r', record, 'p', presence})
end
local state = {}
if presence == '1' and ARGV[11] ~= '0' then state = redis.call('HGETALL', KEYS[4]) end
return {1, old or false, old_presence or false, record, state}
"""
)

# GROUP_DISCARD: remove one membership; does nothing if it is not there.
# KEYS[1..7] as GROUP_ADD; KEYS[8] the owning node's inbox (or KEYS[7]), KEYS[9] its armed
# mark (or KEYS[7])
# ARGV[1] group, ARGV[2] channel, ARGV[3] owning node token ('' for a normal channel),
# ARGV[4] '1' to tell the owning node through its inbox, ARGV[5] inbox max length, ARGV[6]
# the owning node's bell channel ('' for a normal channel)
# Returns {1 if removed else 0, the presence record if it was a presence member else false}.
GROUP_DISCARD = (
    _PRELUDE
    + _MEMBERSHIP
    + _BELL
    + """
local group, channel, token = ARGV[1], ARGV[2], ARGV[3]
if ARGV[4] == '1' then
  append(KEYS[8], KEYS[9], ARGV[6], 'PUBLISH', ARGV[5], {'o', 'd', 'g', group, 'c', channel})
end
local g = {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local removed, presence = remove_member(g, KEYS[7], group, channel, token)
return {removed and 1 or 0, presence}
"""
)

# SYNC: write a batch of one node's memberships as the node holds them: re-adds (after the
# node was pruned while alive, or Redis lost its data) and removals (retried until Redis
# confirms them, or found by reconciliation). Refused while the node is not live, so a node
# that was pruned writes nothing back until its heartbeat has re-registered it.
# KEYS[1] P:{x}:nodes, KEYS[2] the node's channel hash (P:{n.<token>}:c)
# ARGV[1] prefix, ARGV[2] node token, ARGV[3] group_expiry ms, ARGV[4] node key TTL ms, then
# groups of five: op ('a' add / 'r' remove), group, channel, record, presence ('1'/'0')
# Returns {0} when the node is not live; else {1, then kind, group, channel, record for each
# change worth reporting: 'j' a presence membership that was missing and is now added, 'l' a
# presence membership that was there and is now removed, 's' the join stamp given to an
# added record that had none}.
SYNC = (
    _PRELUDE
    + _MEMBERSHIP
    + """
local prefix, token = ARGV[1], ARGV[2]
if not live(KEYS[1], token) then return {0} end
local gexp, node_ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local changes = {1}
for i = 5, #ARGV, 5 do
  local op, group, channel = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local g = group_keys(prefix, group)
  if op == 'a' then
    local _, old_presence, record = add_member(g, KEYS[2], group, channel, token, ARGV[i + 3], ARGV[i + 4], gexp, 0, node_ttl)
    local kind = false
    if ARGV[i + 4] == '1' and not old_presence then kind = 'j'
    elseif string.sub(ARGV[i + 3], 1, 1) == ':' then kind = 's' end
    if kind then
      table.insert(changes, kind); table.insert(changes, group); table.insert(changes, channel); table.insert(changes, record)
    end
  else
    local _, presence = remove_member(g, KEYS[2], group, channel, token)
    if presence then
      table.insert(changes, 'l'); table.insert(changes, group); table.insert(changes, channel); table.insert(changes, presence)
    end
  end
end
return changes
"""
)

# The node table's part of a beat, shared by HEARTBEAT and CLUSTER_BEAT_TABLE. KEYS[1..4]
# are P:{x}:nodes (token -> deadline), ni (token -> info), nid (node id -> token) and tid
# (token -> node id) in both scripts.
_NODE_TABLE = """
local function id_taken(token, node_id, now)
  -- {-1, other token} when another live process holds node_id; nil otherwise.
  local other = redis.call('HGET', KEYS[3], node_id)
  if other and other ~= token then
    local other_deadline = redis.call('ZSCORE', KEYS[1], other)
    if other_deadline and tonumber(other_deadline) >= now then return {-1, other} end
  end
  return nil
end
local function beat_table(token, node_id, info, deadline, now, table_ttl)
  -- Record the beat; returns the tokens whose deadline has passed (at most 16 per beat).
  redis.call('ZADD', KEYS[1], deadline, token)
  redis.call('HSET', KEYS[2], token, info)
  redis.call('HSET', KEYS[3], node_id, token)
  redis.call('HSET', KEYS[4], token, node_id)
  for i = 1, 4 do extend(KEYS[i], table_ttl) end
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 16)
end
"""

# HEARTBEAT: record that a node is alive, and report what it needs to know.
# KEYS[1..4] P:{x}:nodes, ni, nid, tid; KEYS[5] the node's tombstone; KEYS[6] P:{x}:flush;
# KEYS[7] the node's inbox; KEYS[8] its full set; KEYS[9] its channel hash; KEYS[10..] node
# zsets of other key layouts (checked on the first beat)
# ARGV[1] token, ARGV[2] node id, ARGV[3] node info (msgpack), ARGV[4] node_timeout ms,
# ARGV[5] '1' on first registration, ARGV[6] node key TTL ms, ARGV[7] node table TTL ms,
# ARGV[8] inbox max length, ARGV[9] inbox retention ms (older entries are trimmed)
# Returns {-1, other token} when the node id is taken by another live process; {-2} when the
# token is already known (a collision: pick another); {-3, key} when a live node of another
# key layout uses this prefix; else {existed 1/0, was pruned 1/0, now ms, flush epoch or '',
# dead tokens (at most 16 per beat), newest inbox entry id}.
HEARTBEAT = (
    _PRELUDE
    + _NODE_TABLE
    + """
local token, node_id = ARGV[1], ARGV[2]
local now = now_ms()
-- Each node's score is its own deadline (last beat + its own node_timeout), so nodes with
-- different timeouts (a rolling configuration change) judge each other by the right one.
local deadline = now + tonumber(ARGV[4])
if ARGV[5] == '1' then
  for i = 10, #KEYS do
    if #redis.call('ZRANGEBYSCORE', KEYS[i], now, '+inf', 'LIMIT', 0, 1) > 0 then return {-3, KEYS[i]} end
  end
  if redis.call('ZSCORE', KEYS[1], token) or redis.call('HEXISTS', KEYS[4], token) == 1
     or redis.call('EXISTS', KEYS[5], KEYS[7]) > 0 then
    return {-2}
  end
  local taken = id_taken(token, node_id, now)
  if taken then return taken end
end
local existed = redis.call('ZSCORE', KEYS[1], token) and 1 or 0
local pruned = redis.call('EXISTS', KEYS[5])
local dead = beat_table(token, node_id, ARGV[3], deadline, now, tonumber(ARGV[7]))
if pruned == 1 then redis.call('DEL', KEYS[5]) end
if redis.call('EXISTS', KEYS[7]) == 0 then
  -- Only the live node creates its inbox; sends never do (NOMKSTREAM). 'o' 'n' is a no-op.
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[8], '*', 'o', 'n')
end
local node_ttl = tonumber(ARGV[6])
for i = 7, 9 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], node_ttl) end
end
-- Entries older than expiry can only be expired messages: trim them (a quiet inbox would
-- otherwise keep up to its MAXLEN for good).
redis.call('XTRIM', KEYS[7], 'MINID', '~', now - tonumber(ARGV[9]))
local newest = redis.call('XREVRANGE', KEYS[7], '+', '-', 'COUNT', 1)
local newest_id = newest[1] and newest[1][1] or '0-0'
return {existed, pruned, now, redis.call('GET', KEYS[6]) or '', dead, newest_id,
        redis.call('ZCOUNT', KEYS[1], now, '+inf')}
"""
)

# PRUNE_NODE: remove a dead node and every membership of its channels, atomically, once.
# A dead node's inbox is kept for ARGV[3] ms (what was sent to it before the pruning still
# reaches it if it comes back within expiry); a clean stop deletes it.
# KEYS[1..4] P:{x}:nodes, ni, nid, tid; KEYS[5] the node's channel hash; KEYS[6] its inbox;
# KEYS[7] its full set; KEYS[8] its tombstone
# ARGV[1] prefix, ARGV[2] token, ARGV[3] retention ms (inbox and tombstone), ARGV[4] '1' when
# a node removes itself on a clean stop (no liveness check, no tombstone, inbox deleted)
# Returns {0} when there was nothing to prune (already pruned, or it beat again meanwhile);
# else {1, then group, channel, record for each presence membership removed}.
PRUNE_NODE = (
    _PRELUDE
    + """
local prefix, token, own = ARGV[1], ARGV[2], ARGV[4] == '1'
local seen = redis.call('ZSCORE', KEYS[1], token)
if not own then
  if not seen then return {0} end
  if tonumber(seen) >= now_ms() then return {0} end  -- its deadline has not passed
end
local result = {1}
local index = redis.call('HGETALL', KEYS[5])
for i = 1, #index, 2 do
  local channel = index[i]
  for group in string.gmatch(index[i + 1], '%S+') do
    if redis.call('HDEL', gkey(prefix, group, 'm'), channel) == 1 then
      decr(gkey(prefix, group, 'n'), token)
      local pm = gkey(prefix, group, 'pm')
      local record = redis.call('HGET', pm, channel)
      if record then
        redis.call('HDEL', pm, channel)
        decr(gkey(prefix, group, 'p'), token)
        table.insert(result, group); table.insert(result, channel); table.insert(result, record)
      end
    end
  end
end
redis.call('DEL', KEYS[5], KEYS[7])
if own then redis.call('DEL', KEYS[6]) else redis.call('PEXPIRE', KEYS[6], ARGV[3]) end
redis.call('ZREM', KEYS[1], token)
redis.call('HDEL', KEYS[2], token)
local node_id = redis.call('HGET', KEYS[4], token)
if node_id then
  if redis.call('HGET', KEYS[3], node_id) == token then redis.call('HDEL', KEYS[3], node_id) end
  redis.call('HDEL', KEYS[4], token)
end
if not own then redis.call('SET', KEYS[8], '1', 'PX', ARGV[3]) end
return result
"""
)

# INFLIGHT_OPEN: start (or resume) a receiver's in-flight list with a placeholder item, so
# BLMOVE always moves into an existing list and the list keeps its TTL: a receiver that dies
# between a pop and its acknowledgement leaves nothing behind for longer than the TTL.
# KEYS[1] the in-flight list (P:{c.<channel>}:i.<run>). ARGV[1] TTL ms.
# Returns 1.
INFLIGHT_OPEN = """
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('RPUSH', KEYS[1], '') end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# INFLIGHT_ACK: the item BLMOVE put at the tail of the in-flight list is in this process's
# buffer: drop it from the list and renew the list's TTL.
# KEYS[1] the in-flight list. ARGV[1] TTL ms.
# Returns 1 when an item was dropped, 0 when only the placeholder (or nothing) was there.
INFLIGHT_ACK = """
local tail = redis.call('LINDEX', KEYS[1], -1)
local dropped = 0
if tail and tail ~= '' then redis.call('RPOP', KEYS[1]); dropped = 1 end
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('RPUSH', KEYS[1], '') end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return dropped
"""

# RESTORE_INFLIGHT: give back what a cancelled or failed receive had moved out of a queue.
# KEYS[1] the receiver's in-flight list, KEYS[2] the queue (P:{c.<channel>}:q)
# ARGV[1] the item already delivered locally (skipped once), or '' for none; ARGV[2] the
# queue's expiry ms (a queue that had expired meanwhile gets its TTL back); ARGV[3] the
# in-flight TTL ms to reopen the list with, or '' to leave it deleted
# Returns the number of items put back at the head of the queue, in their original order.
RESTORE_INFLIGHT = (
    _PRELUDE
    + """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
local skipped, restored = false, 0
for i = #items, 1, -1 do
  if items[i] == '' then
    -- the placeholder
  elseif not skipped and ARGV[1] ~= '' and items[i] == ARGV[1] then
    skipped = true
  else
    redis.call('LPUSH', KEYS[2], items[i])
    restored = restored + 1
  end
end
if restored > 0 then extend(KEYS[2], tonumber(ARGV[2]) + 1000) end
if ARGV[3] ~= '' then
  redis.call('RPUSH', KEYS[1], '')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return restored
"""
)

# TAKE_TOKENS: a token bucket shared by every process (for example a per-user rate limit that
# holds across nodes). Tokens refill continuously at ARGV[1] per second up to ARGV[2].
# KEYS[1] the bucket (P:{r.<key>}:b, a hash of tokens and the last refill time)
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
# KEYS[1] P:{x}:nodes, KEYS[2] P:{x}:ni
# Returns {now ms, flat token/deadline list, flat token/info list}.
NODES = (
    _PRELUDE
    + """
return {now_ms(), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), redis.call('HGETALL', KEYS[2])}
"""
)

# -- Redis Cluster ----------------------------------------------------------------------------
# On a cluster a script may only touch keys of one slot, so the multi-slot scripts above are
# split by slot (channels_distrib.cluster runs them): the node's own keys ({n.<token>}), the
# node table ({x}), and each group ({g.<group>}). A node's liveness for these scripts is its
# live mark P:{n.<token>}:live (its deadline ms, written by CLUSTER_BEAT_NODE), in its own
# slot, so a refused add and a pruning claim are decided atomically with the node's index.

# CLUSTER_FAN_READ: the first of a cluster group send's two round trips, on the group's slot:
# the nodes to append to, the normal-channel members to queue for (past group_expiry ones are
# removed here; their own group sets expire by TTL), and for a room with history the message
# stored and numbered (as ROOM_SEND).
# KEYS[1] P:{g.<group>}:n (or :p), KEYS[2] :q, KEYS[3] :m, KEYS[4] :qc, KEYS[5] :pm; for a
# room send also KEYS[6] :h, KEYS[7] :hc
# ARGV[1] kind 'g'/'p', ARGV[2] payload, ARGV[3] channel to exclude ('' for none),
# ARGV[4] group_expiry ms, ARGV[5] default capacity
# Returns {node tokens, flat channel/capacity list, offset or false}.
CLUSTER_FAN_READ = (
    _PRELUDE
    + _MEMBERSHIP
    + _HISTORY
    + """
local kind, payload, exclude, gexp = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local offset = false
if KEYS[7] then offset = hist_append(KEYS[6], KEYS[7], payload, exclude, gexp) or false end
local queues = {}
if redis.call('EXISTS', KEYS[2]) == 1 then  -- presence-only sends: presence members only
  local g = {KEYS[3], '', '', KEYS[5], KEYS[2], KEYS[4]}
  for _, channel in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms() - gexp)) do
    remove_member(g, false, '', channel, '')
  end
  for _, channel in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if channel ~= exclude and (kind == 'g' or redis.call('HEXISTS', KEYS[5], channel) == 1) then
      table.insert(queues, channel)
      table.insert(queues, redis.call('HGET', KEYS[4], channel) or ARGV[5])
    end
  end
end
return {redis.call('HKEYS', KEYS[1]), queues, offset}
"""
)

# CLUSTER_ADD_SIDE: the channel's side of GROUP_ADD, run first: refused unless the owning
# node is live; writes the channel's index, stamps the record, tells the owning node.
# KEYS[1] the channel's index (P:{n.<token>}:c, or P:{c.<channel>}:g for a normal channel),
# KEYS[2] the node's live mark, KEYS[3] its inbox, KEYS[4] its armed mark (all KEYS[1] for a
# normal channel)
# ARGV[1] group, ARGV[2] channel, ARGV[3] token ('' for a normal channel), ARGV[4] record
# (':<msgpack>' is stamped here), ARGV[5] presence '1'/'0', ARGV[6] group_expiry ms,
# ARGV[7] '1' to notify the owning node, ARGV[8] inbox max length, ARGV[9] node key TTL ms,
# ARGV[10] the node's bell channel ('' for a normal channel)
# Returns {0} when refused (the node is not live); else {1, the stamped record}.
CLUSTER_ADD_SIDE = (
    _PRELUDE
    + _WORDS
    + _BELL
    + """
local group, channel, token, record = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if string.sub(record, 1, 1) == ':' then record = now_ms() .. record end
if token == '' then
  redis.call('SADD', KEYS[1], group)
  extend(KEYS[1], tonumber(ARGV[6]))
  return {1, record}
end
local deadline = redis.call('GET', KEYS[2])
if not deadline or tonumber(deadline) < now_ms() then return {0} end
add_word(KEYS[1], channel, group)
extend(KEYS[1], tonumber(ARGV[9]))
if ARGV[7] == '1' then
  append(KEYS[3], KEYS[4], ARGV[10], 'SPUBLISH', ARGV[8], {'o', 'a', 'g', group, 'c', channel, 'r', record, 'p', ARGV[5]})
end
return {1, record}
"""
)

# CLUSTER_ADD_GROUP: the group's side of GROUP_ADD, after CLUSTER_ADD_SIDE accepted it.
# KEYS[1..6] the group's m, n, p, pm, q, qc
# ARGV[1] group, ARGV[2] channel, ARGV[3] token, ARGV[4] stamped record, ARGV[5] presence,
# ARGV[6] group_expiry ms, ARGV[7] capacity (normal channels), ARGV[8] '0' to skip reading
# the presence state
# Returns {1, old record or false, old presence record or false, record, presence state}.
CLUSTER_ADD_GROUP = (
    _PRELUDE
    + _MEMBERSHIP
    + """
local g = {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local old, old_presence, record = add_member(g, false, ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7], 0)
local state = {}
if ARGV[5] == '1' and ARGV[8] ~= '0' then state = redis.call('HGETALL', KEYS[4]) end
return {1, old or false, old_presence or false, record, state}
"""
)

# CLUSTER_DISCARD_SIDE: the channel's side of GROUP_DISCARD (sent with CLUSTER_DISCARD_GROUP
# in one pipeline; each is idempotent).
# KEYS[1] the channel's index, KEYS[2] the owning node's inbox, KEYS[3] its armed mark (both
# KEYS[1] for a normal channel)
# ARGV[1] group, ARGV[2] channel, ARGV[3] token, ARGV[4] '1' to notify, ARGV[5] inbox max
# length, ARGV[6] the node's bell channel ('' for a normal channel)
# Returns 1.
CLUSTER_DISCARD_SIDE = (
    _WORDS
    + _BELL
    + """
if ARGV[3] == '' then redis.call('SREM', KEYS[1], ARGV[1]) else remove_word(KEYS[1], ARGV[2], ARGV[1]) end
if ARGV[4] == '1' then
  append(KEYS[2], KEYS[3], ARGV[6], 'SPUBLISH', ARGV[5], {'o', 'd', 'g', ARGV[1], 'c', ARGV[2]})
end
return 1
"""
)

# CLUSTER_DISCARD_GROUP: the group's side of GROUP_DISCARD; also how a pruner or a sync
# removes: the HDEL's result says who removed it, so a leave is announced once.
# KEYS[1..6] the group's m, n, p, pm, q, qc
# ARGV[1] group, ARGV[2] token, then channels to remove
# Returns a flat list: for each channel removed, the channel and its presence record or ''.
CLUSTER_DISCARD_GROUP = (
    _PRELUDE
    + _MEMBERSHIP
    + """
local g = {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local result = {}
for i = 3, #ARGV do
  local removed, presence = remove_member(g, false, ARGV[1], ARGV[i], ARGV[2])
  if removed then table.insert(result, ARGV[i]); table.insert(result, presence or '') end
end
return result
"""
)

# CLUSTER_SYNC_SIDE: the node's side of SYNC, run first: refused while the node is not live.
# KEYS[1] the node's live mark, KEYS[2] its channel hash
# ARGV[1] node key TTL ms, then triples: op ('a'/'r'), group, channel
# Returns 1, or 0 when the node is not live (nothing written).
CLUSTER_SYNC_SIDE = (
    _PRELUDE
    + _WORDS
    + """
local deadline = redis.call('GET', KEYS[1])
if not deadline or tonumber(deadline) < now_ms() then return 0 end
for i = 2, #ARGV, 3 do
  if ARGV[i] == 'a' then add_word(KEYS[2], ARGV[i + 2], ARGV[i + 1])
  else remove_word(KEYS[2], ARGV[i + 2], ARGV[i + 1]) end
end
if redis.call('EXISTS', KEYS[2]) == 1 then extend(KEYS[2], tonumber(ARGV[1])) end
return 1
"""
)

# CLUSTER_SYNC_GROUP: one group's part of a SYNC batch (one per group, pipelined per master).
# KEYS[1..6] the group's m, n, p, pm, q, qc
# ARGV[1] group, ARGV[2] token, ARGV[3] group_expiry ms, then quadruples: op, channel, record,
# presence
# Returns flat kind, channel, record triples, kinds as SYNC's ('j', 'l', 's').
CLUSTER_SYNC_GROUP = (
    _PRELUDE
    + _MEMBERSHIP
    + """
local g = {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local group, token, gexp = ARGV[1], ARGV[2], tonumber(ARGV[3])
local changes = {}
for i = 4, #ARGV, 4 do
  local op, channel, given, presence = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local kind, record = false, false
  if op == 'a' then
    local _, old_presence
    _, old_presence, record = add_member(g, false, group, channel, token, given, presence, gexp, 0, 0)
    if presence == '1' and not old_presence then kind = 'j'
    elseif string.sub(given, 1, 1) == ':' then kind = 's' end
  else
    local _, removed_presence = remove_member(g, false, group, channel, token)
    if removed_presence then kind, record = 'l', removed_presence end
  end
  if kind then
    table.insert(changes, kind); table.insert(changes, channel); table.insert(changes, record)
  end
end
return changes
"""
)

# CLUSTER_BEAT_TABLE: the node table's side of HEARTBEAT (slot {x}), run first.
# KEYS[1..4] P:{x}:nodes, ni, nid, tid; KEYS[5] P:{x}:flush
# ARGV[1] token, ARGV[2] node id, ARGV[3] node info, ARGV[4] node_timeout ms, ARGV[5] '1' on
# first registration, ARGV[6] node table TTL ms
# Returns {-1, other token} / {-2} as HEARTBEAT; else {1, now ms, flush epoch or '', dead
# tokens (at most 16), live node count}.
CLUSTER_BEAT_TABLE = (
    _PRELUDE
    + _NODE_TABLE
    + """
local token, node_id = ARGV[1], ARGV[2]
local now = now_ms()
if ARGV[5] == '1' then
  if redis.call('ZSCORE', KEYS[1], token) or redis.call('HEXISTS', KEYS[4], token) == 1 then
    return {-2}
  end
  local taken = id_taken(token, node_id, now)
  if taken then return taken end
end
local dead = beat_table(token, node_id, ARGV[3], now + tonumber(ARGV[4]), now, tonumber(ARGV[6]))
return {1, now, redis.call('GET', KEYS[5]) or '', dead, redis.call('ZCOUNT', KEYS[1], now, '+inf')}
"""
)

# CLUSTER_BEAT_NODE: the node's own side of HEARTBEAT (slot {n.<token>}).
# KEYS[1] live mark, KEYS[2] tombstone, KEYS[3] inbox, KEYS[4] full set, KEYS[5] channel hash
# ARGV[1] node_timeout ms, ARGV[2] '1' on first registration, ARGV[3] node key TTL ms,
# ARGV[4] inbox max length, ARGV[5] inbox retention ms
# Returns {-2} on a token collision; else {live mark existed 1/0, was pruned 1/0, newest
# inbox entry id}.
CLUSTER_BEAT_NODE = (
    _PRELUDE
    + """
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3]) > 0 then return {-2} end
local now = now_ms()
local existed = redis.call('EXISTS', KEYS[1])
local pruned = redis.call('EXISTS', KEYS[2])
-- The mark holds the deadline and outlives it (node key TTL): a late beat is told from a lost one.
redis.call('SET', KEYS[1], now + tonumber(ARGV[1]), 'PX', ARGV[3])
if pruned == 1 then redis.call('DEL', KEYS[2]) end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'o', 'n')
end
for i = 3, 5 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
redis.call('XTRIM', KEYS[3], 'MINID', '~', now - tonumber(ARGV[5]))
local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
return {existed, pruned, newest[1] and newest[1][1] or '0-0'}
"""
)

# CLUSTER_PRUNE_CLAIM: the first step of pruning a node on a cluster, in its own slot: once
# its deadline has passed, its channel index moves into P:{n.<token>}:cp (merged with what a
# pruner that died midway left there), its live mark goes and its tombstone is set. The
# group removals that follow are idempotent and P:{n.<token>}:cp is deleted only after them,
# so a pruner that dies midway is finished by the next one.
# KEYS[1] live mark, KEYS[2] channel hash, KEYS[3] the pruning index (:cp), KEYS[4] inbox,
# KEYS[5] full set, KEYS[6] tombstone
# ARGV[1] '1' when a node removes itself on a clean stop, ARGV[2] retention ms
# Returns {0} when the node is live; else {1, flat channel/groups list still to remove}.
CLUSTER_PRUNE_CLAIM = (
    _PRELUDE
    + _WORDS
    + """
local own = ARGV[1] == '1'
if not own then
  local deadline = redis.call('GET', KEYS[1])
  if deadline and tonumber(deadline) >= now_ms() then return {0} end
end
local index = redis.call('HGETALL', KEYS[2])
for i = 1, #index, 2 do
  for group in string.gmatch(index[i + 1], '%S+') do add_word(KEYS[3], index[i], group) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[5])
if own then
  redis.call('DEL', KEYS[4])
else
  redis.call('PEXPIRE', KEYS[4], ARGV[2])
  redis.call('SET', KEYS[6], '1', 'PX', ARGV[2])
end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
return {1, redis.call('HGETALL', KEYS[3])}
"""
)

# CLUSTER_PRUNE_TABLE: the last step of pruning: the node leaves the node table, unless it
# beat again meanwhile (then it re-registers itself: its beat saw the tombstone).
# KEYS[1..4] P:{x}:nodes, ni, nid, tid
# ARGV[1] token, ARGV[2] '1' on a clean stop (no deadline check)
# Returns 1 when this call removed the node's entry, else 0.
CLUSTER_PRUNE_TABLE = (
    _PRELUDE
    + """
local token = ARGV[1]
if ARGV[2] ~= '1' then
  local seen = redis.call('ZSCORE', KEYS[1], token)
  if seen and tonumber(seen) >= now_ms() then return 0 end
end
local removed = redis.call('ZREM', KEYS[1], token)
redis.call('HDEL', KEYS[2], token)
local node_id = redis.call('HGET', KEYS[4], token)
if node_id then
  if redis.call('HGET', KEYS[3], node_id) == token then redis.call('HDEL', KEYS[3], node_id) end
  redis.call('HDEL', KEYS[4], token)
end
return removed
"""
)


# CLUSTER_NOTE_GROUPS: note groups in a node's directory on one master (the groups there it
# has members in), sent in the same per-master pipeline as, and before, the group writes: if
# the master holding the node's own index loses it, a pruner still finds these groups. The
# directory may keep groups the node left (harmless: a purge there finds nothing); the node
# removes those when it reconciles.
# KEYS[1] P:{m.<i>}:g.<token>
# ARGV[1] TTL ms (renewed by the node's heartbeat), then group names
# Returns how many groups were new there.
CLUSTER_NOTE_GROUPS = """
local added = 0
for i = 2, #ARGV do added = added + redis.call('SADD', KEYS[1], ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return added
"""

# CLUSTER_PURGE_TOKEN: remove from one group every membership of a node that is gone without
# trace (no node table entry, no live mark or a past one: a master lost its table entry or
# its index before or while it was pruned, so pruning cannot find these), as a pruner would.
# KEYS[1..6] the group's m, n, p, pm, q, qc
# ARGV[1] group, ARGV[2] the node's token
# Returns flat channel / presence record ('' when none) pairs of what was removed.
CLUSTER_PURGE_TOKEN = (
    _PRELUDE
    + _MEMBERSHIP
    + """
local g = {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local token = ARGV[2]
local result = {}
-- A node's channels in a group are counted in :n (every one) and :p (presence ones).
if redis.call('HEXISTS', KEYS[2], token) == 0 and redis.call('HEXISTS', KEYS[3], token) == 0 then
  return result
end
local marker = '.' .. token .. '!'
for _, channel in ipairs(redis.call('HKEYS', KEYS[1])) do
  local bang = string.find(channel, '!', 1, true)
  local head = bang and string.sub(channel, 1, bang) or ''
  if string.sub('.' .. head, -#marker) == marker then
    local removed, presence = remove_member(g, false, ARGV[1], channel, token)
    if removed then table.insert(result, channel); table.insert(result, presence or '') end
  end
end
redis.call('HDEL', KEYS[2], token)
redis.call('HDEL', KEYS[3], token)
return result
"""
)

ALL = {
    "send_queue": SEND_QUEUE,
    "send_inbox": SEND_INBOX,
    "arm_inbox": ARM_INBOX,
    "cluster_append": CLUSTER_APPEND,
    "group_send": GROUP_SEND,
    "room_send": ROOM_SEND,
    "history_configure": HISTORY_CONFIGURE,
    "history_append": HISTORY_APPEND,
    "history_read": HISTORY_READ,
    "history_info": HISTORY_INFO,
    "group_add": GROUP_ADD,
    "group_discard": GROUP_DISCARD,
    "sync": SYNC,
    "heartbeat": HEARTBEAT,
    "prune_node": PRUNE_NODE,
    "nodes": NODES,
    "inflight_open": INFLIGHT_OPEN,
    "inflight_ack": INFLIGHT_ACK,
    "restore_inflight": RESTORE_INFLIGHT,
    "take_tokens": TAKE_TOKENS,
    "cluster_fan_read": CLUSTER_FAN_READ,
    "cluster_add_side": CLUSTER_ADD_SIDE,
    "cluster_add_group": CLUSTER_ADD_GROUP,
    "cluster_discard_side": CLUSTER_DISCARD_SIDE,
    "cluster_discard_group": CLUSTER_DISCARD_GROUP,
    "cluster_sync_side": CLUSTER_SYNC_SIDE,
    "cluster_sync_group": CLUSTER_SYNC_GROUP,
    "cluster_beat_table": CLUSTER_BEAT_TABLE,
    "cluster_beat_node": CLUSTER_BEAT_NODE,
    "cluster_prune_claim": CLUSTER_PRUNE_CLAIM,
    "cluster_prune_table": CLUSTER_PRUNE_TABLE,
    "cluster_purge_token": CLUSTER_PURGE_TOKEN,
    "cluster_note_groups": CLUSTER_NOTE_GROUPS,
}
