//! The Lua scripts that make each change to the shared state atomic with its event.
//! Redis runs a script alone; the event it publishes is ordered with the change.

use redis::Script;

/// Shared Lua helpers, prepended to the scripts that need them. `owned` wraps a seat
/// with its owner; `snapshot` is the reply every seat-changing script returns.
const LUA_HELPERS: &str = r#"
local function has(list, x)
  for _, v in ipairs(list) do if v == x then return true end end
  return false
end
local function owned(owners, sid, json)
  return '{"instance":' .. cjson.encode(redis.call('HGET', owners, sid) or '') .. ',"seat":' .. json .. '}'
end
-- INCR, but a counter that is missing (a Redis that restarted without its data) starts
-- from the current time in microseconds, so it still only ever grows: instances compare
-- sequence numbers with ones they saw before the restart, and nodes still hold seat ids.
-- Returns the value as a string: Lua numbers are doubles, and concatenating one this
-- large prints it rounded in exponent form.
local function bump(k)
  if redis.call('EXISTS', k) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', k, t[1] .. string.rep('0', 6 - #t[2]) .. t[2])
  end
  redis.call('INCR', k)
  return redis.call('GET', k)
end
local function publish(channel, room, seq, kind)
  redis.call('PUBLISH', channel, '{"room":' .. cjson.encode(room) .. ',"seq":' .. seq .. ',"kind":' .. kind .. '}')
end
-- Removes the room's seats whose owner stopped saying it is alive (it crashed or lost
-- Redis for longer than the instance TTL); everyone hears they left.
local function purge_dead(seats, owners, idents, seqk, channel, room, live_prefix)
  local all = redis.call('HGETALL', owners)
  local alive = {}
  for i = 1, #all, 2 do
    local sid, inst = all[i], all[i + 1]
    if alive[inst] == nil then alive[inst] = redis.call('EXISTS', live_prefix .. inst) == 1 end
    if not alive[inst] then
      local json = redis.call('HGET', seats, sid)
      redis.call('HDEL', seats, sid)
      redis.call('HDEL', owners, sid)
      if json then
        local identity = cjson.decode(json).identity
        if redis.call('HGET', idents, identity) == sid then redis.call('HDEL', idents, identity) end
        publish(channel, room, bump(seqk), '{"left":{"instance":' .. cjson.encode(inst) .. ',"seat":' .. json .. ',"reason":"disconnected"}}')
      end
    end
  end
end
local function snapshot(seats, owners, nodek, domk, settingsk, seqk, room)
  local all = redis.call('HGETALL', seats)
  local parts = {}
  for i = 1, #all, 2 do parts[#parts + 1] = owned(owners, all[i], all[i + 1]) end
  local node = ''
  if #all > 0 then node = redis.call('GET', nodek) or '' end
  return '"seq":' .. (redis.call('GET', seqk) or '0')
    .. ',"seats":[' .. table.concat(parts, ',') .. ']'
    .. ',"node":' .. cjson.encode(node)
    .. ',"dominant":' .. cjson.encode(redis.call('GET', domk) or '')
    .. ',"settings":' .. cjson.encode(redis.call('HGET', settingsk, room) or '')
end
"#;

/// KEYS: seats owners identities node dominant settings rooms seq
/// ARGV: room identity name protocol instance resume(0/1) nodes(JSON array) id channel
///       live-prefix live-ttl-ms
const JOIN: &str = r#"
local seats, owners, idents, nodek, domk, settingsk, roomsk, seqk =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local room, identity, name, protocol, instance = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local resume, nodes, id, channel = ARGV[6] == '1', cjson.decode(ARGV[7]), ARGV[8], ARGV[9]
-- The joiner's instance is alive (also right after a Redis restart, before its next
-- heartbeat).
redis.call('SET', ARGV[10] .. instance, '1', 'PX', ARGV[11])
purge_dead(seats, owners, idents, seqk, channel, room, ARGV[10])
local function reply(outcome, extra)
  return '{"outcome":"' .. outcome .. '",' .. extra
    .. snapshot(seats, owners, nodek, domk, settingsk, seqk, room) .. '}'
end
local replaced = 'null'
local existing = redis.call('HGET', idents, identity)
if existing then
  local json = redis.call('HGET', seats, existing)
  if json then
    local old = cjson.decode(json)
    local owner = redis.call('HGET', owners, existing) or ''
    if resume and tostring(old.protocol) == protocol and (owner == instance or has(nodes, old.node)) then
      local from = 'null'
      if owner ~= instance then
        redis.call('HSET', owners, existing, instance)
        publish(channel, room, 0, '{"moved":' .. owned(owners, existing, json) .. '}')
        from = cjson.encode(owner)
      end
      return reply('resumed', '"seat":' .. json .. ',"from":' .. from .. ',')
    end
    replaced = owned(owners, existing, json)
    redis.call('HDEL', seats, existing)
    redis.call('HDEL', owners, existing)
    local seq = bump(seqk)
    publish(channel, room, seq, '{"left":{"instance":' .. cjson.encode(owner) .. ',"seat":' .. json .. ',"reason":"replaced"}}')
  end
  redis.call('HDEL', idents, identity)
end
local node = redis.call('GET', nodek)
if node and redis.call('HLEN', seats) > 0 then
  if not has(nodes, node) then
    return '{"outcome":"unreachable","node":' .. cjson.encode(node) .. '}'
  end
else
  if #nodes == 0 then
    redis.call('DEL', nodek, domk)
    redis.call('SREM', roomsk, room)
    return '{"outcome":"no_node"}'
  end
  node = nodes[1]
  redis.call('SET', nodek, node)
  redis.call('DEL', domk)
end
local seat = '{"id":' .. id .. ',"room":' .. cjson.encode(room) .. ',"identity":' .. cjson.encode(identity)
  .. ',"name":' .. cjson.encode(name) .. ',"protocol":' .. protocol
  .. ',"muted":false,"speaking":false,"publishing":false,"tracks":[],"node":' .. cjson.encode(node)
  .. ',"chat_ready":false,"enhanced":false}'
redis.call('HSET', seats, id, seat)
redis.call('HSET', owners, id, instance)
redis.call('HSET', idents, identity, id)
redis.call('SADD', roomsk, room)
local seq = bump(seqk)
publish(channel, room, seq, '{"joined":{"instance":' .. cjson.encode(instance) .. ',"seat":' .. seat .. '}}')
return reply('seated', '"seat":' .. seat .. ',"replaced":' .. replaced .. ',')
"#;

/// KEYS: seats owners seq   ARGV: room id instance seat-json channel announce(0/1)
const UPDATE: &str = r#"
local seats, owners, seqk = KEYS[1], KEYS[2], KEYS[3]
local room, id, instance, json, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('HGET', owners, id) ~= instance or redis.call('HEXISTS', seats, id) == 0 then
  return 0
end
redis.call('HSET', seats, id, json)
if ARGV[6] ~= '1' then return 1 end
local seq = bump(seqk)
publish(channel, room, seq, '{"updated":{"instance":' .. cjson.encode(instance) .. ',"seat":' .. json .. '}}')
return 1
"#;

/// KEYS: seats owners identities node dominant rooms seq   ARGV: room id instance reason channel
const REMOVE: &str = r#"
local seats, owners, idents, nodek, domk, roomsk, seqk =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local room, id, instance, reason, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('HGET', owners, id) ~= instance then return false end
local json = redis.call('HGET', seats, id)
if not json then return false end
redis.call('HDEL', seats, id)
redis.call('HDEL', owners, id)
local identity = cjson.decode(json).identity
if redis.call('HGET', idents, identity) == id then redis.call('HDEL', idents, identity) end
if redis.call('HLEN', seats) == 0 then
  redis.call('DEL', seats, owners, idents, nodek, domk)
  redis.call('SREM', roomsk, room)
end
local seq = bump(seqk)
publish(channel, room, seq, '{"left":{"instance":' .. cjson.encode(instance) .. ',"seat":' .. json .. ',"reason":' .. cjson.encode(reason) .. '}}')
return json
"#;

/// KEYS: seats owners node dominant settings seq   ARGV: room
const SNAPSHOT: &str = r#"
return '{' .. snapshot(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[1]) .. '}'
"#;

/// KEYS: seat_id
const SEAT_ID: &str = "return bump(KEYS[1])";

/// KEYS: node dominant   ARGV: node participant-or-empty
const DOMINANT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[2]) else redis.call('SET', KEYS[2], ARGV[2]) end
return 1
"#;

/// KEYS: chat_id stream   ARGV: maxlen retention_ms identity name text ts channel room sender
const CHAT_APPEND: &str = r#"
redis.call('INCR', KEYS[1])
local id = redis.call('GET', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], id .. '-0',
  'identity', ARGV[3], 'name', ARGV[4], 'text', ARGV[5], 'ts', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
publish(ARGV[7], ARGV[8], 0, '{"chat":{"sender":' .. ARGV[9] .. ',"message":{"id":' .. id
  .. ',"from":{"identity":' .. cjson.encode(ARGV[3]) .. ',"name":' .. cjson.encode(ARGV[4])
  .. '},"text":' .. cjson.encode(ARGV[5]) .. ',"ts":' .. ARGV[6] .. '}}}')
return id
"#;

/// KEYS: stream   ARGV: id channel room
const CHAT_DELETE: &str = r#"
local n = redis.call('XDEL', KEYS[1], ARGV[1] .. '-0')
if n > 0 then publish(ARGV[2], ARGV[3], 0, '{"chat_deleted":{"id":' .. ARGV[1] .. '}}') end
return n
"#;

pub(super) struct Scripts {
    pub(super) seat_id: Script,
    pub(super) join: Script,
    pub(super) update: Script,
    pub(super) remove: Script,
    pub(super) snapshot: Script,
    pub(super) dominant: Script,
    pub(super) chat_append: Script,
    pub(super) chat_delete: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let with_helpers = |body: &str| Script::new(&format!("{LUA_HELPERS}\n{body}"));
        Scripts {
            seat_id: with_helpers(SEAT_ID),
            join: with_helpers(JOIN),
            update: with_helpers(UPDATE),
            remove: with_helpers(REMOVE),
            snapshot: with_helpers(SNAPSHOT),
            dominant: Script::new(DOMINANT),
            chat_append: with_helpers(CHAT_APPEND),
            chat_delete: with_helpers(CHAT_DELETE),
        }
    }
}
