#!lua name=banbus
--[[
banbus function library: the single write path for ban and allowlist changes.

Every client (Python nodes, the banbus CLI, operators with redis-cli) goes
through these functions, so they all get the same validation and the same
atomic "update the record, index the expiry, append the event, trim the log".

Calls (KEYS[1] is the namespace NS, default "banbus", or any key of it such
as "{banbus}:log" — what a user limited by ACL to ~{banbus}:* must pass;
keywords are case-insensitive):

  FCALL banbus_ban      1 NS target ttl [reason] [FORCE] [REPLACE] [ORIGIN name] [EID id]
                                              [RETRY ms] [RESEED ms] [STATUS]
  FCALL banbus_allow    1 NS target ttl [reason] [...the same options]
  FCALL banbus_unban    1 NS target [ORIGIN name] [EID id] [RETRY ms] [STATUS] [FORCE]
  FCALL banbus_disallow 1 NS target [ORIGIN name] [EID id] [RETRY ms] [STATUS] [FORCE]
  FCALL banbus_clear    1 NS [ORIGIN name] [EID id] [RETRY ms] [STATUS]
  FCALL banbus_repair   1 NS        -> {stream_repaired, digest_before, digest_after}
  FCALL banbus_report   1 NS ip kind [weight] [ORIGIN name] [DETAIL text]
        -> {status, count, threshold, target, seq, stream_id, expires_ms, strike, window, ttl,
            reason}
  FCALL banbus_policy   1 NS SET kind [THRESHOLD n] [WINDOW s] [TTL s] [ESCALATE x]
                                  [MAX_TTL s] [FORGET s] [IPV4_PREFIX n] [IPV6_PREFIX n]
                                  [SHADOW 0|1]          -> {kind, stored text}
  FCALL banbus_policy   1 NS DELETE kind                -> 1 | 0
  FCALL_RO banbus_policies 1 NS     -> {{kind, text, source, shadow_crossings}, ...}
  FCALL_RO banbus_state   1 NS      -> {head_id, head_seq, epoch, server_ms, version}
  FCALL_RO banbus_digest  1 NS cutoff_ms -> {head_seq, head_id, status, d1, d2, n}
  FCALL_RO banbus_check   1 NS target [FORCE]   -> canonical target
  FCALL_RO banbus_version 0         -> version

  ttl is whole seconds, 0 = permanent.  The reason is ALWAYS the third
  positional argument of ban/allow when present, even if it looks like a
  keyword: to pass an option without a reason, give an empty one:
      FCALL banbus_ban 1 banbus 10.0.0.0/7 0 "" FORCE
  FORCE accepts a prefix wider than the configured minimum (never /0).
  REPLACE sets the expiry to exactly the new one (default: the later of the
  active old one and the new one; permanent wins).  Removal (unban/disallow)
  never needs FORCE; it is accepted there and ignored.
  EID gives the event its id (default <epoch>-<seq>).
  RETRY ms (with EID) marks a call that may repeat one whose answer was lost:
    if an event with this EID is in the stream at or after server time ms,
    nothing is written and its reply comes back ('duplicate').  When the
    stream was trimmed past ms the call cannot be checked: it is written and
    answered 'unverified'.
  RESEED ms (ban/allow; nodes restoring a namespace after data loss) writes
    only when the target is absent and was not removed at or after server
    time ms; otherwise nothing is written ('present' or 'lifted').

  Writes reply {seq, stream_id, target, expires_ms} — with STATUS (and always
  with RETRY or RESEED) {seq, stream_id, target, expires_ms, status, epoch}
  (the short form is what library v3 answered: nodes of that version keep
  working during a rolling upgrade).  Status is one of
  written, absent (a removal of a target that was not recorded: the event is
  written all the same, and the removal remembered), duplicate, unverified,
  present, lifted (the last two write nothing: seq 0, stream_id "").

Reports (auto-ban): `kind` names a policy (built in: scan, auth; others set
with banbus_policy).  The address is widened to the policy's prefix (IPv6 /64
by default) and its offenses counted in a sliding window: the times of the
last `threshold` ones, in {NS}:offenses:<kind>:<target>, expiring with the
window.  The report that brings `threshold` offenses within `window` seconds
crosses: the window starts afresh and, unless the allowlist covers the
address or the target is banned already, a ban is written exactly like
banbus_ban's, lasting ttl * escalate^(strike-1) (at most max_ttl), where the
strike counts this kind's bans of the target until `forget` seconds after
the last one ended ({NS}:strikes:<kind>:<target>).  Status: counted, banned,
already (the target itself is banned), allowed (the allowlist covers the
address), or shadow (policy in shadow mode: nothing banned; a
`would_ban` entry without seq goes to the stream and {NS}:shadow counts it).
DETAIL is attacker text (a path, a user name): sanitised into the reason,
never a reason to refuse.

Stream format: entries that change the record carry `seq`; informational
entries (op would_ban) carry none, and a node skips any op it does not know
that has no seq.

Keys (one hash tag, so the namespace lives in one Cluster slot with KEYS[1]):
  {NS}:log        stream: op target [expires reason] origin eid seq
  {NS}:bans       hash target -> [expires_ms, reason, origin, seq, created_ms] (JSON;
                  expires 0 = permanent; created: first written while live; the
                  origin is the last writer's)
  {NS}:bans:exp   zset target -> expires_ms (non-permanent entries only)
  {NS}:allow, {NS}:allow:exp   the same for the allowlist
  {NS}:seq        event counter     {NS}:epoch   id of this incarnation of the keyspace
  {NS}:head       hash: id of the last event written here (its seq is
                  {NS}:seq); d1, d2: the record's digest (see banbus/_digest.py)
  {NS}:removed    zset "b <target>" | "a <target>" | "*" (clear) -> ms of the
                  last removal (capped at TOMBSTONE_LIMIT members)
  {NS}:config     hash: maxlen, min_prefix_v4, min_prefix_v6, max_ttl (all optional)
  {NS}:policies   hash kind -> "threshold=5 window=600 ttl=900 escalate=2 ..." (auto-ban)
  {NS}:offenses:<kind>:<target>, {NS}:strikes:<kind>:<target>   strings (auto-ban)
  {NS}:shadow     hash kind -> crossings in shadow mode

Nothing here grows with the write rate: the stream is trimmed to maxlen, the
tombstones to TOMBSTONE_LIMIT, the record holds live entries only.

Errors: "BANBUS_INVALID <field> <message>" with field one of target, ttl,
reason, origin, eid, option, usage:, namespace, cutoff; "BANBUS_UNSAFE
<message>" for /0 and prefixes wider than the minimum; "BANBUS_CONFIG
<message>" for a bad {NS}:config.  Nothing is written when a call is refused.
Every argument is bounded before any work is done on it.

Portability: Lua 5.1 without the `bit` library (fakeredis/lupa has none), so
all arithmetic uses whole numbers in doubles (exact below 2^53).
Numbers are turned into strings with %.0f: tostring(1.8e12) is "1.8e+12".
The lines marked "-- @NAME" carry limits from banbus/_keys.py (one source).
]]

local VERSION = 5

local DEFAULT_MAXLEN = 100000 -- @DEFAULT_MAXLEN
local DEFAULT_MIN_V4 = 8 -- @DEFAULT_MIN_PREFIX_V4
local DEFAULT_MIN_V6 = 32 -- @DEFAULT_MIN_PREFIX_V6
local MAX_TTL = 315360000 -- @MAX_TTL_SECONDS
local MAX_EXPIRES = 4294967295000 -- @MAX_EXPIRES_MS
local MAX_TARGET_LENGTH = 64 -- @MAX_TARGET_LENGTH
local MAX_TARGET_INPUT = 256 -- @MAX_TARGET_INPUT_BYTES
local MAX_REASON = 512 -- @MAX_REASON_BYTES
local MAX_ORIGIN = 64 -- @MAX_ORIGIN_BYTES
local MAX_EID = 128 -- @MAX_EID_BYTES
local TOMBSTONE_LIMIT = 100000 -- @TOMBSTONE_LIMIT
local FUTURE_SLACK = 86400000 -- @FUTURE_SLACK_MS
local P1 = 67108859 -- @DIGEST_P1
local P2 = 67108837 -- @DIGEST_P2
local DIGEST_EXCLUDE_LIMIT = 10000 -- @DIGEST_EXCLUDE_LIMIT
local PURGE_BATCH = '100'
-- A number argument (ms, ttl) longer than this is refused unread.
local MAX_NUMBER = 15

-- Errors raised while validating carry this marker so the entry points can
-- turn them into error replies (anything else is re-raised untouched).
local function fail(code, msg)
  error({banbus_error = code .. ' ' .. msg}, 0)
end

local function fmt(n)
  return string.format('%.0f', n)
end

-- Python's repr() of a str, close enough for messages (and truncated like
-- banbus._targets._describe).  Looks at the first 100 bytes only.
local function describe(s)
  s = string.sub(s, 1, 100)
  local q = "'"
  if string.find(s, "'", 1, true) and not string.find(s, '"', 1, true) then
    q = '"'
  end
  local shown = q .. string.gsub(s, '[%z\1-\31\127\\\'"]', function(c)
    if c == '\\' then return '\\\\' end
    if c == q then return '\\' .. c end
    if c == '"' or c == "'" then return c end
    if c == '\t' then return '\\t' end
    if c == '\n' then return '\\n' end
    if c == '\r' then return '\\r' end
    return string.format('\\x%02x', string.byte(c))
  end) .. q
  if #shown > 80 then
    local cut = 77
    -- never split a UTF-8 sequence
    while cut > 1 and (string.byte(shown, cut + 1) or 0) >= 0x80 and string.byte(shown, cut + 1) < 0xC0 do
      cut = cut - 1
    end
    shown = string.sub(shown, 1, cut) .. '...'
  end
  return shown
end

local function split(s, sep)
  local parts, start = {}, 1
  while true do
    local i = string.find(s, sep, start, true)
    if not i then
      parts[#parts + 1] = string.sub(s, start)
      return parts
    end
    parts[#parts + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

-- ---------------------------------------------------------------------------
-- Targets: a mirror of banbus._targets.parse_target (Python's ipaddress and
-- glibc inet_ntop).  tests/test_library.py checks both agree.
-- ---------------------------------------------------------------------------

-- What Python's str.strip() removes: every character with str.isspace(),
-- here as UTF-8 byte sequences.
local ASCII_SPACE = {[9] = true, [10] = true, [11] = true, [12] = true, [13] = true,
  [28] = true, [29] = true, [30] = true, [31] = true, [32] = true}
local UNICODE_SPACE = {'\194\133', '\194\160', '\225\154\128', '\226\128\168', '\226\128\169',
  '\226\128\175', '\226\129\159', '\227\128\128',
  -- U+2000 .. U+200A
  '\226\128\128', '\226\128\129', '\226\128\130', '\226\128\131', '\226\128\132',
  '\226\128\133', '\226\128\134', '\226\128\135', '\226\128\136', '\226\128\137',
  '\226\128\138'}

local function strip(s)
  local i, j = 1, #s
  local moved = true
  while moved and i <= j do
    moved = false
    if ASCII_SPACE[string.byte(s, i)] then
      i, moved = i + 1, true
    else
      for _, w in ipairs(UNICODE_SPACE) do
        if string.sub(s, i, i + #w - 1) == w then
          i, moved = i + #w, true
          break
        end
      end
    end
  end
  moved = true
  while moved and j >= i do
    moved = false
    if ASCII_SPACE[string.byte(s, j)] then
      j, moved = j - 1, true
    else
      for _, w in ipairs(UNICODE_SPACE) do
        if j - #w + 1 >= i and string.sub(s, j - #w + 1, j) == w then
          j, moved = j - #w, true
          break
        end
      end
    end
  end
  return string.sub(s, i, j)
end

-- IPv4Address._ip_int_from_string: four decimal octets, no leading zeros.
local function parse_v4(s)
  local parts = split(s, '.')
  if #parts ~= 4 then return nil end
  local value = 0
  for k = 1, 4 do
    local p = parts[k]
    if not string.find(p, '^%d%d?%d?$') then return nil end
    if #p > 1 and string.sub(p, 1, 1) == '0' then return nil end
    local n = tonumber(p)
    if n > 255 then return nil end
    value = value * 256 + n
  end
  return value
end

local function parse_hextet(s)
  if not string.find(s, '^%x%x?%x?%x?$') then return nil end
  return tonumber(s, 16)
end

-- IPv6Address._ip_int_from_string, step by step; returns 8 16-bit groups.
local function parse_v6(s)
  local parts = split(s, ':')
  if #parts < 3 then return nil end
  if string.find(parts[#parts], '.', 1, true) then
    local v4 = parse_v4(table.remove(parts))
    if not v4 then return nil end
    parts[#parts + 1] = string.format('%x', math.floor(v4 / 65536))
    parts[#parts + 1] = string.format('%x', v4 % 65536)
  end
  local n = #parts
  if n > 9 then return nil end
  local skip = nil
  for i = 2, n - 1 do
    if parts[i] == '' then
      if skip then return nil end
      skip = i
    end
  end
  local hi, lo, skipped
  if skip then
    hi, lo = skip - 1, n - skip
    if parts[1] == '' then
      hi = hi - 1
      if hi ~= 0 then return nil end
    end
    if parts[n] == '' then
      lo = lo - 1
      if lo ~= 0 then return nil end
    end
    skipped = 8 - (hi + lo)
    if skipped < 1 then return nil end
  else
    if n ~= 8 or parts[1] == '' or parts[n] == '' then return nil end
    hi, lo, skipped = 8, 0, 0
  end
  local groups = {}
  for i = 1, hi do
    local g = parse_hextet(parts[i])
    if not g then return nil end
    groups[#groups + 1] = g
  end
  for _ = 1, skipped do
    groups[#groups + 1] = 0
  end
  for i = n - lo + 1, n do
    local g = parse_hextet(parts[i])
    if not g then return nil end
    groups[#groups + 1] = g
  end
  return groups
end

local function format_v4(value)
  return string.format('%d.%d.%d.%d', math.floor(value / 16777216), math.floor(value / 65536) % 256,
    math.floor(value / 256) % 256, value % 256)
end

-- glibc inet_ntop6: longest run (first on ties) of >= 2 zero groups becomes
-- "::"; ::a.b.c.d and ::ffff:a.b.c.d keep the dotted quad.
local function format_v6(g)
  local best_base, best_len, cur_base, cur_len = -1, 0, -1, 0
  for i = 1, 8 do
    if g[i] == 0 then
      if cur_base == -1 then
        cur_base, cur_len = i, 1
      else
        cur_len = cur_len + 1
      end
    elseif cur_base ~= -1 then
      if best_base == -1 or cur_len > best_len then
        best_base, best_len = cur_base, cur_len
      end
      cur_base = -1
    end
  end
  if cur_base ~= -1 and (best_base == -1 or cur_len > best_len) then
    best_base, best_len = cur_base, cur_len
  end
  if best_base ~= -1 and best_len < 2 then
    best_base = -1
  end
  local out = {}
  for i = 1, 8 do
    if best_base ~= -1 and i >= best_base and i < best_base + best_len then
      if i == best_base then out[#out + 1] = ':' end
    else
      if i ~= 1 then out[#out + 1] = ':' end
      if i == 7 and best_base == 1 and (best_len == 6 or (best_len == 5 and g[6] == 0xffff)) then
        out[#out + 1] = format_v4(g[7] * 65536 + g[8])
        return table.concat(out)
      end
      out[#out + 1] = string.format('%x', g[i])
    end
  end
  if best_base ~= -1 and best_base + best_len == 9 then
    out[#out + 1] = ':'
  end
  return table.concat(out)
end

-- Keep the first plen bits of a number made of `count` groups of `width` bits.
local function mask_groups(groups, plen, width)
  local out = {}
  for i = 1, #groups do
    local start = (i - 1) * width
    local keep = plen - start
    if keep >= width then
      out[i] = groups[i]
    elseif keep <= 0 then
      out[i] = 0
    else
      local unit = 2 ^ (width - keep)
      out[i] = groups[i] - groups[i] % unit
    end
  end
  return out
end

local function format_net(version, groups, plen)
  local text
  if version == 4 then
    text = format_v4(groups[1])
  else
    text = format_v6(groups)
  end
  if plen == (version == 4 and 32 or 128) then
    return text
  end
  return text .. '/' .. plen
end

local ADDRESS_HINT = ' is not an IP address or CIDR network '
  .. '(expected e.g. 203.0.113.7, 198.51.100.0/24 or 2001:db8::/48)'

-- Returns the canonical text of `text`; fails like parse_target would.
local function plain_octet(p)
  return #p <= 3 and (#p == 1 or string.byte(p, 1) ~= 48) and tonumber(p) <= 255
end

local function canonical_target(text, min_v4, min_v6, force)
  if #text > MAX_TARGET_INPUT then
    fail('BANBUS_INVALID', 'target is ' .. #text .. ' bytes long; an IP address or CIDR network '
      .. 'is at most ' .. MAX_TARGET_LENGTH)
  end
  -- Fast path, the common case: a plain dotted quad (no space, no prefix,
  -- octets 0-255 without leading zeros) is its own canonical form.  The
  -- general path below gives the same answer, ten times slower.
  local a, b, c, d = string.match(text, '^(%d+)%.(%d+)%.(%d+)%.(%d+)$')
  if a and plain_octet(a) and plain_octet(b) and plain_octet(c) and plain_octet(d) then
    return text
  end
  local raw = strip(text)
  if raw == '' then
    fail('BANBUS_INVALID', 'target is empty; expected an IP address or CIDR network')
  end
  if #raw > MAX_TARGET_LENGTH then
    fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ' is too long to be an IP address')
  end
  if string.find(raw, '%', 1, true) then
    fail('BANBUS_INVALID', 'target ' .. describe(raw)
      .. " has a zone id; ban the address without '%\226\128\166'")
  end
  local address, prefix = raw, nil
  local slash = string.find(raw, '/', 1, true)
  if slash then
    address, prefix = string.sub(raw, 1, slash - 1), string.sub(raw, slash + 1)
  end
  local version, groups, maxlen
  local v4 = parse_v4(address)
  if v4 then
    version, groups, maxlen = 4, {v4}, 32
  else
    groups = parse_v6(address)
    if not groups then
      fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ADDRESS_HINT)
    end
    version, maxlen = 6, 128
  end
  local plen = maxlen
  if prefix then
    if not string.find(prefix, '^%d%d?%d?$') then
      fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ' has an invalid prefix length '
        .. describe(prefix) .. '; expected /0 to /' .. maxlen)
    end
    plen = tonumber(prefix)
    if plen > maxlen then
      fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ' has prefix /' .. plen
        .. ', longer than /' .. maxlen)
    end
  end
  if version == 6 and plen >= 96 and groups[1] == 0 and groups[2] == 0 and groups[3] == 0
      and groups[4] == 0 and groups[5] == 0 and groups[6] == 0xffff then
    -- IPv4-mapped: ::ffff:203.0.113.7 is 203.0.113.7 (dual-stack listeners
    -- report IPv4 peers this way).
    version, groups, plen, maxlen = 4, {groups[7] * 65536 + groups[8]}, plen - 96, 32
  end
  local network
  if version == 4 then
    network = mask_groups(groups, plen, 32)
  else
    network = mask_groups(groups, plen, 16)
  end
  for i = 1, #groups do
    if network[i] ~= groups[i] then
      fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ' has host bits set; did you mean '
        .. format_net(version, network, plen) .. '?')
    end
  end
  local canonical = format_net(version, network, plen)
  if plen == 0 then
    fail('BANBUS_UNSAFE', canonical .. ' would match every IPv' .. version .. ' address; refused')
  end
  local minimum = version == 4 and min_v4 or min_v6
  if plen < minimum and not force then
    fail('BANBUS_UNSAFE', canonical .. ' is wider than the minimum prefix /' .. minimum
      .. '; pass FORCE to override')
  end
  return canonical
end

-- ---------------------------------------------------------------------------
-- Arguments
-- ---------------------------------------------------------------------------

-- KEYS[1] is the namespace itself ("banbus") or any key of it ("{banbus}:log"):
-- a user whose ACL allows only ~{banbus}:* must pass a key of that form.
local function namespace(keys, usage)
  if #keys ~= 1 then
    fail('BANBUS_INVALID', 'usage: ' .. usage)
  end
  local ns = keys[1]
  if #ns <= 200 and string.byte(ns, 1) == 123 then  -- '{'
    ns = string.match(ns, '^{([^{}]*)}:') or ns
  end
  if #ns < 1 or #ns > 64 or string.find(ns, '[{}%s%z\1-\31\127]') then
    fail('BANBUS_INVALID', 'namespace ' .. describe(ns)
      .. ' must be 1 to 64 characters without braces, spaces or control characters')
  end
  return ns
end

local function key(ns, suffix)
  return '{' .. ns .. '}:' .. suffix
end

-- Before a function writes anything: every key it may touch, in one command.
-- In a Redis Cluster whose slot for the namespace is being migrated, keys move
-- one MIGRATE at a time; a script touching a key that has already left fails
-- at that command, after the writes before it.  Touching them all first makes
-- it fail before any write (the caller retries once the slot has settled).
-- Elsewhere it costs one EXISTS.
local function settled(ns, ...)
  redis.call('EXISTS', key(ns, 'log'), key(ns, 'bans'), key(ns, 'bans:exp'), key(ns, 'allow'),
    key(ns, 'allow:exp'), key(ns, 'seq'), key(ns, 'epoch'), key(ns, 'head'), key(ns, 'removed'),
    key(ns, 'config'), ...)
end

local function config_int(ns, name, value, default, low, high)
  if not value then return default end
  if #value > MAX_NUMBER or not string.find(value, '^%d+$') then
    fail('BANBUS_CONFIG', key(ns, 'config') .. ' ' .. name .. ' ' .. describe(value)
      .. ' is not a whole number')
  end
  local n = tonumber(value)
  if n < low or n > high then
    fail('BANBUS_CONFIG', key(ns, 'config') .. ' ' .. name .. ' ' .. value .. ' is outside '
      .. low .. '..' .. fmt(high))
  end
  return n
end

local function read_config(ns)
  local v = redis.call('HMGET', key(ns, 'config'), 'maxlen', 'min_prefix_v4', 'min_prefix_v6',
    'max_ttl')
  return {
    maxlen = config_int(ns, 'maxlen', v[1], DEFAULT_MAXLEN, 1, 1e15),
    min_v4 = config_int(ns, 'min_prefix_v4', v[2], DEFAULT_MIN_V4, 0, 32),
    min_v6 = config_int(ns, 'min_prefix_v6', v[3], DEFAULT_MIN_V6, 0, 128),
    -- A namespace may lower the maximum TTL, never raise it: every node
    -- enforces what the record accepts.
    max_ttl = config_int(ns, 'max_ttl', v[4], MAX_TTL, 1, MAX_TTL),
  }
end

local function parse_ttl(text, max_ttl)
  if #text > MAX_NUMBER or not string.find(text, '^%d+$') then
    if string.find(string.sub(text, 1, MAX_NUMBER + 1), '^%d+$') then
      fail('BANBUS_INVALID', 'ttl ' .. describe(text) .. ' is above the maximum of '
        .. fmt(max_ttl) .. ' seconds; use 0 for a permanent entry')
    end
    fail('BANBUS_INVALID', 'ttl ' .. describe(text)
      .. ' is not a whole number of seconds; expected 0 (permanent) to ' .. fmt(max_ttl))
  end
  local n = tonumber(text)
  if n > max_ttl then
    fail('BANBUS_INVALID', 'ttl ' .. describe(text) .. ' is above the maximum of '
      .. fmt(max_ttl) .. ' seconds; use 0 for a permanent entry')
  end
  return n
end

local function parse_ms(field, text)
  if #text > MAX_NUMBER or not string.find(text, '^%d+$') then
    fail('BANBUS_INVALID', field .. ' ' .. describe(text)
      .. ' is not a server time in milliseconds')
  end
  return tonumber(text)
end

local function valid_utf8(s)
  if not string.find(s, '[\128-\255]') then return true end  -- ASCII
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    if c < 0x80 then
      i = i + 1
    else
      local need
      if c >= 0xC2 and c <= 0xDF then
        need = 1
      elseif c >= 0xE0 and c <= 0xEF then
        need = 2
      elseif c >= 0xF0 and c <= 0xF4 then
        need = 3
      else
        return false
      end
      if i + need > n then return false end
      local lo, hi = 0x80, 0xBF
      if c == 0xE0 then
        lo = 0xA0
      elseif c == 0xED then
        hi = 0x9F
      elseif c == 0xF0 then
        lo = 0x90
      elseif c == 0xF4 then
        hi = 0x8F
      end
      local c2 = string.byte(s, i + 1)
      if c2 < lo or c2 > hi then return false end
      for k = 2, need do
        local ck = string.byte(s, i + k)
        if ck < 0x80 or ck > 0xBF then return false end
      end
      i = i + need + 1
    end
  end
  return true
end

-- C1 controls, U+2028..U+202E (separators, bidi embeddings and overrides),
-- U+2066..U+2069 (bidi isolates): invisible, and they rewrite what a terminal
-- shows.  Refused in reasons; replaced in attacker text (sanitise).
local INVISIBLE = {'\194[\128-\159]', '\226\128[\168-\174]', '\226\129[\166-\169]'}

local function check_reason(reason)
  if #reason > MAX_REASON then
    fail('BANBUS_INVALID', 'reason is ' .. #reason .. ' bytes long; the limit is ' .. MAX_REASON)
  end
  local bad = string.find(reason, '[%z\1-\31\127]')
  if bad then
    fail('BANBUS_INVALID', string.format('reason contains the control character 0x%02x at byte %d; '
      .. 'use printable text on one line', string.byte(reason, bad), bad))
  end
  if not valid_utf8(reason) then
    fail('BANBUS_INVALID', 'reason is not valid UTF-8')
  end
  local at
  for _, pattern in ipairs(INVISIBLE) do
    at = at or string.find(reason, pattern)
  end
  if at then
    fail('BANBUS_INVALID', 'reason contains a C1 control or a bidi/line-separator character at '
      .. 'byte ' .. at .. '; use printable text')
  end
end

local function check_name(field, value, limit)
  if #value < 1 or #value > limit or string.find(value, '[^%w%.%_%:%@%-]') then
    fail('BANBUS_INVALID', field .. ' ' .. describe(value) .. ' must be 1 to ' .. limit
      .. ' characters of A-Z a-z 0-9 . _ : @ -')
  end
end

-- Options after the positional arguments.  `kind` is 'add' (ban/allow),
-- 'remove' (unban/disallow) or 'clear'.
local function parse_options(args, first, kind, fname)
  local opts = {force = false, replace = false, origin = 'fcall', eid = nil, retry = nil,
    reseed = nil, status = false}
  local seen = {}
  local i = first
  while i <= #args do
    local word = string.upper(string.sub(args[i], 1, 16))
    if seen[word] then
      fail('BANBUS_INVALID', 'option ' .. word .. ' is given twice')
    end
    seen[word] = true
    local adding = kind == 'add'
    if word == 'FORCE' and kind ~= 'clear' then
      opts.force = true
    elseif word == 'STATUS' then
      opts.status = true
    elseif word == 'REPLACE' and adding then
      opts.replace = true
    elseif word == 'ORIGIN' or word == 'EID' or word == 'RETRY' or (word == 'RESEED' and adding) then
      local value = args[i + 1]
      if value == nil then
        fail('BANBUS_INVALID', 'option ' .. word .. ' needs a value')
      end
      if word == 'ORIGIN' then
        check_name('origin', value, MAX_ORIGIN)
        opts.origin = value
      elseif word == 'EID' then
        check_name('eid', value, MAX_EID)
        opts.eid = value
      elseif word == 'RETRY' then
        opts.retry = parse_ms('retry', value)
      else
        opts.reseed = parse_ms('reseed', value)
      end
      i = i + 1
    elseif word == 'REPLACE' or word == 'RESEED' or word == 'FORCE' then
      fail('BANBUS_INVALID', 'option ' .. word .. ' does not apply to ' .. fname)
    else
      local expected
      if adding then
        expected = 'FORCE, REPLACE, ORIGIN <name>, EID <id>, RETRY <ms>, RESEED <ms> or STATUS'
      elseif kind == 'remove' then
        expected = 'ORIGIN <name>, EID <id>, RETRY <ms>, STATUS or FORCE'
      else
        expected = 'ORIGIN <name>, EID <id>, RETRY <ms> or STATUS'
      end
      local hint = adding and ' (the reason, if any, is the third argument: use "" for none)' or ''
      fail('BANBUS_INVALID', 'option ' .. describe(args[i]) .. ' is unknown to ' .. fname
        .. '; expected ' .. expected .. hint)
    end
    i = i + 1
  end
  if opts.retry and not opts.eid then
    fail('BANBUS_INVALID', 'option RETRY needs EID <id>: it looks for that event')
  end
  return opts
end

-- ---------------------------------------------------------------------------
-- The record digest (mirrors banbus/_digest.py)
-- ---------------------------------------------------------------------------

local function entry_hash(kind_char, target, expires)
  -- ((target bytes as one number) * 2^50 + seconds * 4 + kind) mod P,
  -- squared: reduced three bytes at a time (a < 2^26, so a * 2^24 + 2^24
  -- stays exact), without building a string.
  local n = #target
  local a, b = 0, 0
  local i = n % 3
  if i > 0 then
    local c1, c2 = string.byte(target, 1, i)
    local v = c2 and (c1 * 256 + c2) or c1
    a, b = v, v
  end
  i = i + 1
  while i <= n do
    local c1, c2, c3 = string.byte(target, i, i + 2)
    local v = (c1 * 256 + c2) * 256 + c3
    a = (a * 16777216 + v) % P1
    b = (b * 16777216 + v) % P2
    i = i + 3
  end
  local seconds = math.ceil(expires / 1000)
  local hi, lo = math.floor(seconds / 16777216), seconds % 16777216
  local k = kind_char == 'b' and 1 or 2
  a = ((((a * 16777216 + hi) % P1) * 16777216 + lo) % P1 * 4 + k) % P1
  b = ((((b * 16777216 + hi) % P2) * 16777216 + lo) % P2 * 4 + k) % P2
  return (a * a) % P1, (b * b) % P2
end

local function record_expires(text)
  local e = string.match(text, '^%[%s*(%d+)')
  return e and tonumber(e)
end

-- The digest lives in {NS}:head as two plain sums, d1 and d2, kept with
-- HINCRBY (no read on the write path): each stays below entries * 2^26,
-- exact in int64 and in Lua's doubles up to 2^27 entries.  They are reduced
-- modulo P1/P2 when read.  The entry count is HLEN of the two hashes.
local function digest_delta(delta, kind_char, target, expires, sign)
  local h1, h2 = entry_hash(kind_char, target, expires)
  delta[1] = delta[1] + sign * h1
  delta[2] = delta[2] + sign * h2
end

local function add_digest(ns, delta)
  if delta[1] ~= 0 or delta[2] ~= 0 then
    redis.call('HINCRBY', key(ns, 'head'), 'd1', delta[1])
    redis.call('HINCRBY', key(ns, 'head'), 'd2', delta[2])
  end
end

local TABLES = {{'b', 'bans'}, {'a', 'allow'}}

-- The digest of the whole record, computed from scratch into {NS}:head (a
-- namespace written by library v3, a head deleted by hand, `banbus_repair`
-- after hand edits).  O(entries).  Returns the sums.
local function rehash(ns)
  local delta = {0, 0}
  for _, t in ipairs(TABLES) do
    local cursor = '0'
    repeat
      local page = redis.call('HSCAN', key(ns, t[2]), cursor, 'COUNT', 1000)
      cursor = page[1]
      local flat = page[2]
      for i = 1, #flat, 2 do
        local e = record_expires(flat[i + 1])
        if e then digest_delta(delta, t[1], flat[i], e, 1) end
      end
    until cursor == '0'
  end
  redis.call('HSET', key(ns, 'head'), 'd1', delta[1], 'd2', delta[2])
  return delta
end

local function field_of(fields, name)
  for j = 1, #fields - 1, 2 do
    if fields[j] == name then return fields[j + 1] end
  end
  return nil
end

-- After a write: the head moves to this event, and the digest by *delta*.
-- A head that did not exist yet (library v3, deleted by hand) gets its
-- digest computed from the record instead.
local function advance_head(ns, id, delta)
  if redis.call('HSET', key(ns, 'head'), 'id', id) == 1 then
    rehash(ns)
  else
    add_digest(ns, delta)
  end
end

-- ---------------------------------------------------------------------------
-- The stream
-- ---------------------------------------------------------------------------

local function id_ms(id)
  return tonumber(string.match(id, '^(%d+)')) or 0
end

-- An XADD with a huge id (by hand: XADD {NS}:log 18446744073709551615-... )
-- makes `XADD *` fail for everyone.  Delete the entries far ahead of the
-- server clock and move the stream's last id back to the newest one left;
-- readers past it resync.  Returns the number of entries deleted.
local function repair_stream(ns, now)
  local log = key(ns, 'log')
  if redis.call('TYPE', log)['ok'] ~= 'stream' then
    return 0
  end
  local limit = now + FUTURE_SLACK
  local removed = 0
  while true do
    local page = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 100)
    local done = #page == 0
    for i = 1, #page do
      if id_ms(page[i][1]) > limit then
        redis.call('XDEL', log, page[i][1])
        removed = removed + 1
      else
        done = true
        break
      end
    end
    if done then break end
  end
  local newest = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  local info = redis.call('XINFO', 'STREAM', log)
  local last_generated
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last_generated = info[i + 1] end
  end
  if last_generated and id_ms(last_generated) > limit then
    local ok = nil
    if newest[1] then
      ok = redis.pcall('XSETID', log, newest[1][1])
    end
    if not newest[1] or (type(ok) == 'table' and ok.err) then
      -- Nothing left to keep, or no XSETID (fakeredis): start the stream
      -- afresh; the record is intact and readers resync from it.
      redis.call('DEL', log)
    end
    redis.log(redis.LOG_WARNING, 'banbus: ' .. log .. ' had ids far in the future (' ..
      last_generated .. '); deleted ' .. removed .. ' entries and reset the last id')
    return removed + 1
  end
  return removed
end

local function xadd(ns, maxlen, now, fields)
  local log = key(ns, 'log')
  local ok = redis.pcall('XADD', log, 'MAXLEN', '~', fmt(maxlen), '*', unpack(fields))
  if type(ok) == 'table' and ok.err then
    if repair_stream(ns, now) == 0 then
      return redis.error_reply(ok.err)
    end
    return redis.call('XADD', log, 'MAXLEN', '~', fmt(maxlen), '*', unpack(fields))
  end
  return ok
end

-- The event with `eid` written at or after server time `since`, searched
-- from the newest entry back.  Returns the entry, or nil and whether the
-- search could see the whole window (false: the stream was trimmed past it).
local function find_event(ns, eid, since)
  local log = key(ns, 'log')
  if redis.call('EXISTS', log) == 0 then
    return nil, true
  end
  local upper = '+'
  while true do
    local page = redis.call('XREVRANGE', log, upper, '-', 'COUNT', 200)
    if #page == 0 then break end
    for i = 1, #page do
      local entry = page[i]
      if id_ms(entry[1]) < since then
        return nil, true
      end
      local fields = entry[2]
      for j = 1, #fields - 1, 2 do
        if fields[j] == 'eid' then
          if fields[j + 1] == eid then return entry end
          break
        end
      end
    end
    upper = '(' .. page[#page][1]
  end
  -- Reached the oldest entry without passing `since`: the window is whole
  -- only if nothing was ever trimmed or deleted from this stream.
  local info = redis.call('XINFO', 'STREAM', log)
  local added, length
  for i = 1, #info, 2 do
    if info[i] == 'entries-added' then added = info[i + 1] end
    if info[i] == 'length' then length = info[i + 1] end
  end
  return nil, added ~= nil and added == length
end

-- ---------------------------------------------------------------------------
-- Writes
-- ---------------------------------------------------------------------------

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), t
end

local function json_string(s)
  -- Control characters never get here (reason, origin and target are
  -- validated), so quotes and backslashes are all there is to escape.
  return '"' .. string.gsub(s, '[\\"]', '\\%0') .. '"'
end

local function record_json(expires, reason, origin, seq, created)
  return '[' .. fmt(expires) .. ',' .. json_string(reason) .. ',' .. json_string(origin) .. ','
    .. fmt(seq) .. ',' .. fmt(created) .. ']'
end

-- When a stored entry was first written (its 5th element; records of library
-- v4 and older have 4, and no creation time).
local function record_created(text)
  local created = string.match(text, ',%d+,(%d+)%]$')
  return created and tonumber(created)
end

-- Expired entries leave the record here (nodes expire them locally, so no
-- events).  The digest follows.
local function purge(ns, kind_char, table_name, now)
  local zkey, hkey = key(ns, table_name .. ':exp'), key(ns, table_name)
  local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', fmt(now), 'LIMIT', '0', PURGE_BATCH)
  if #expired > 0 then
    local values = redis.call('HMGET', hkey, unpack(expired))
    local delta = {0, 0}
    for i = 1, #expired do
      local e = values[i] and record_expires(values[i])
      if e then digest_delta(delta, kind_char, expired[i], e, -1) end
    end
    redis.call('ZREM', zkey, unpack(expired))
    redis.call('HDEL', hkey, unpack(expired))
    add_digest(ns, delta)
  end
end

local function ensure_epoch(ns, time)
  local epoch_key = key(ns, 'epoch')
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    epoch = time[1] .. string.format('%06d', tonumber(time[2]))
    redis.call('SET', epoch_key, epoch)
  end
  return epoch
end

local function remember_removal(ns, member, now)
  local rkey = key(ns, 'removed')
  redis.call('ZADD', rkey, fmt(now), member)
  local count = redis.call('ZCARD', rkey)
  if count > TOMBSTONE_LIMIT then
    redis.call('ZREMRANGEBYRANK', rkey, 0, count - TOMBSTONE_LIMIT - 1)
  end
end

-- Was `member` (or the whole namespace) removed at or after `since`?  Also
-- true when tombstones that old may have been dropped by the cap.
local function removed_since(ns, member, since)
  local rkey = key(ns, 'removed')
  local t = redis.call('ZSCORE', rkey, member)
  if t and tonumber(t) >= since then return true end
  local c = redis.call('ZSCORE', rkey, '*')
  if c and tonumber(c) >= since then return true end
  if redis.call('ZCARD', rkey) >= TOMBSTONE_LIMIT then
    local oldest = redis.call('ZRANGE', rkey, 0, 0, 'WITHSCORES')
    if oldest[2] and tonumber(oldest[2]) > since then return true end
  end
  return false
end

local function current_epoch(ns)
  return redis.call('GET', key(ns, 'epoch')) or ''
end

local function duplicate_reply(ns, entry, target)
  local fields = entry[2]
  return {tonumber(field_of(fields, 'seq')) or 0, entry[1], field_of(fields, 'target') or target,
    tonumber(field_of(fields, 'expires')) or 0, 'duplicate', current_epoch(ns)}
end

local OPS = {
  banbus_ban = {op = 'ban', kind = 'add', table_name = 'bans', char = 'b'},
  banbus_allow = {op = 'allow', kind = 'add', table_name = 'allow', char = 'a'},
  banbus_unban = {op = 'unban', kind = 'remove', table_name = 'bans', char = 'b'},
  banbus_disallow = {op = 'disallow', kind = 'remove', table_name = 'allow', char = 'a'},
}

local store

local function write(fname, keys, args)
  local spec = OPS[fname]
  local adding = spec.kind == 'add'
  local usage
  if adding then
    usage = 'FCALL ' .. fname .. ' 1 <namespace> <target> <ttl> [reason] [FORCE] [REPLACE] '
      .. '[ORIGIN <name>] [EID <id>] [RETRY <ms>] [RESEED <ms>]'
  else
    usage = 'FCALL ' .. fname .. ' 1 <namespace> <target> [ORIGIN <name>] [EID <id>] [RETRY <ms>]'
  end
  local ns = namespace(keys, usage)
  settled(ns)
  local npos = adding and 2 or 1
  if #args < npos then
    fail('BANBUS_INVALID', 'usage: ' .. usage)
  end
  local reason = ''
  if adding and args[3] ~= nil then
    reason = args[3]
  end
  local opts = parse_options(args, adding and 4 or 2, spec.kind, fname)

  -- 1. Validate everything before writing anything.
  local cfg = read_config(ns)
  -- Removing an entry is never unsafe, so it needs no FORCE.
  local target = canonical_target(args[1], cfg.min_v4, cfg.min_v6, opts.force or not adding)
  local ttl = 0
  if adding then
    ttl = parse_ttl(args[2], cfg.max_ttl)
    check_reason(reason)
  end

  local now, time = now_ms()
  -- 2. A retried call whose first attempt was written gets that reply.
  local status = 'written'
  if opts.retry then
    local entry, complete = find_event(ns, opts.eid, opts.retry)
    if entry then return duplicate_reply(ns, entry, target) end
    if not complete then status = 'unverified' end
  end
  return store(ns, spec, cfg, target, ttl, reason, opts, now, time, status)
end

-- Steps 3 to 5 of a write, once everything is validated (also the ban a
-- report's crossing creates).
store = function(ns, spec, cfg, target, ttl, reason, opts, now, time, status)
  local adding = spec.kind == 'add'

  -- 3. Purge what has expired (nodes expire locally, so no events).
  purge(ns, 'b', 'bans', now)
  purge(ns, 'a', 'allow', now)

  local hkey, zkey = key(ns, spec.table_name), key(ns, spec.table_name .. ':exp')
  local expires = 0
  local old = redis.call('HGET', hkey, target)
  local old_exp = old and record_expires(old)
  if adding then
    -- 4. ban/allow: the later expiry wins unless REPLACE; permanent (0) wins.
    if ttl > 0 then
      expires = now + ttl * 1000
    end
    local live = old_exp and (old_exp == 0 or old_exp > now)
    if opts.reseed then
      -- Restoring after data loss: never over an entry, never over a removal.
      if live then return {0, '', target, 0, 'present', current_epoch(ns)} end
      if removed_since(ns, spec.char .. ' ' .. target, opts.reseed) then
        return {0, '', target, 0, 'lifted', current_epoch(ns)}
      end
    end
    if live and not opts.replace then
      if old_exp == 0 or expires == 0 then
        expires = 0
      elseif old_exp > expires then
        expires = old_exp
      end
    end
  elseif not old then
    status = 'absent'
  end

  -- 5. The event, then the record.  Redis has no rollback: everything that
  -- can fail (a WRONGTYPE, a stream that cannot take entries) fails before
  -- the first change below (the purge above only removes what has expired),
  -- except the XADD itself, which goes first and is checked.
  local epoch = ensure_epoch(ns, time)
  local seq = redis.call('INCR', key(ns, 'seq'))
  local eid = opts.eid or (epoch .. '-' .. fmt(seq))
  local id
  if adding then
    id = xadd(ns, cfg.maxlen, now, {'op', spec.op, 'target', target, 'expires', fmt(expires),
      'reason', reason, 'origin', opts.origin, 'eid', eid, 'seq', fmt(seq)})
  else
    id = xadd(ns, cfg.maxlen, now, {'op', spec.op, 'target', target, 'origin', opts.origin,
      'eid', eid, 'seq', fmt(seq)})
  end
  if type(id) == 'table' then
    redis.call('DECR', key(ns, 'seq'))  -- no event: the counter does not move either
    return id
  end
  local delta = {0, 0}
  if old_exp then digest_delta(delta, spec.char, target, old_exp, -1) end
  if adding then
    -- A live entry extended keeps its creation time; anything else starts anew.
    local created = now
    if old_exp and (old_exp == 0 or old_exp > now) then
      created = record_created(old) or now
    end
    redis.call('HSET', hkey, target, record_json(expires, reason, opts.origin, seq, created))
    if expires > 0 then
      redis.call('ZADD', zkey, fmt(expires), target)
    else
      redis.call('ZREM', zkey, target)
    end
    digest_delta(delta, spec.char, target, expires, 1)
  else
    if old then
      redis.call('HDEL', hkey, target)
      redis.call('ZREM', zkey, target)
    end
    remember_removal(ns, spec.char .. ' ' .. target, now)
  end
  advance_head(ns, id, delta)
  if opts.status then
    return {seq, id, target, expires, status, epoch}
  end
  return {seq, id, target, expires}
end

-- ---------------------------------------------------------------------------
-- Auto-ban: policies and offense counting (banbus_report)
-- ---------------------------------------------------------------------------

local MAX_THRESHOLD = 1000 -- @MAX_THRESHOLD
local MAX_KINDS = 64 -- @MAX_POLICY_KINDS
local MAX_DETAIL = 200 -- @MAX_DETAIL_BYTES
local MAX_ESCALATE = 100

-- Built-in policies: what `scan` and `auth` mean until an operator sets them
-- (mirrors banbus/_policy.py BUILTIN_POLICIES).
local BUILTIN_POLICIES = {
  scan = 'threshold=3 window=300 ttl=3600 escalate=2 max_ttl=604800 forget=604800 '
    .. 'ipv4_prefix=32 ipv6_prefix=64 shadow=0',
  auth = 'threshold=5 window=600 ttl=900 escalate=2 max_ttl=86400 forget=86400 '
    .. 'ipv4_prefix=32 ipv6_prefix=64 shadow=0',
}
local POLICY_DEFAULTS = 'escalate=1 max_ttl=604800 forget=86400 ipv4_prefix=32 ipv6_prefix=64 '
  .. 'shadow=0'

local function check_kind(kind)
  if #kind < 1 or #kind > 32 or string.find(kind, '[^a-z0-9_.-]') then
    fail('BANBUS_INVALID', 'kind ' .. describe(kind)
      .. ' must be 1 to 32 characters of a-z 0-9 _ . -')
  end
end

-- One field of a policy: `code` is BANBUS_INVALID for a call's argument and
-- BANBUS_CONFIG for what is stored in {NS}:policies.
local function policy_value(code, kind, name, text, cfg)
  local decimal = name == 'escalate'
  local ok = #text <= MAX_NUMBER and string.find(text, decimal and '^%d+%.?%d*$' or '^%d+$')
  local low, high
  if name == 'threshold' or name == 'weight' then low, high = 1, MAX_THRESHOLD
  elseif name == 'window' then low, high = 1, MAX_TTL
  elseif name == 'ttl' then low, high = 0, cfg.max_ttl
  elseif name == 'escalate' then low, high = 1, MAX_ESCALATE
  elseif name == 'max_ttl' then low, high = 1, cfg.max_ttl
  elseif name == 'forget' then low, high = 0, MAX_TTL
  elseif name == 'ipv4_prefix' then low, high = cfg.min_v4, 32
  elseif name == 'ipv6_prefix' then low, high = cfg.min_v6, 128
  elseif name == 'shadow' then low, high = 0, 1
  else
    fail(code, 'policy ' .. kind .. ': unknown field ' .. describe(name)
      .. '; expected threshold, window, ttl, escalate, max_ttl, forget, ipv4_prefix, '
      .. 'ipv6_prefix or shadow')
  end
  local where = code == 'BANBUS_INVALID' and (name .. ' ') or ('policy ' .. kind .. ' ' .. name .. ' ')
  if not ok then
    fail(code, where .. describe(text) .. ' is not a ' .. (decimal and 'number' or 'whole number'))
  end
  local n = tonumber(text)
  if n < low or n > high then
    fail(code, where .. text .. ' is outside ' .. fmt(low) .. '..' .. fmt(high))
  end
  return n
end

local POLICY_ORDER = {'threshold', 'window', 'ttl', 'escalate', 'max_ttl', 'forget',
  'ipv4_prefix', 'ipv6_prefix', 'shadow'}

local function read_fields(p, text, code, kind, cfg)
  if #text > 1024 then
    fail(code, 'policy ' .. kind .. ' is ' .. #text .. ' bytes long')
  end
  for name, value in string.gmatch(text, '([^%s=]+)=(%S*)') do
    p[name] = policy_value(code, kind, name, value, cfg)
  end
end

local function check_policy(p, code, kind)
  for _, name in ipairs(POLICY_ORDER) do
    if p[name] == nil then
      fail(code, 'policy ' .. kind .. ' has no ' .. name
        .. (code == 'BANBUS_INVALID' and ' (a new policy needs THRESHOLD, WINDOW and TTL)' or ''))
    end
  end
  if p.ttl > 0 and p.ttl > p.max_ttl then
    fail(code, 'policy ' .. kind .. ': ttl ' .. fmt(p.ttl) .. ' is above max_ttl ' .. fmt(p.max_ttl))
  end
end

local function format_policy(p)
  local out = {}
  for _, name in ipairs(POLICY_ORDER) do
    local v = p[name]
    if name == 'escalate' then
      out[#out + 1] = name .. '=' .. string.format('%.6g', v)
    else
      out[#out + 1] = name .. '=' .. fmt(v)
    end
  end
  return table.concat(out, ' ')
end

local function stored_policy(ns, kind, cfg)
  local text = redis.call('HGET', key(ns, 'policies'), kind)
  local p = {}
  if text then
    read_fields(p, POLICY_DEFAULTS, 'BANBUS_CONFIG', kind, cfg)
    read_fields(p, text, 'BANBUS_CONFIG', kind, cfg)
  elseif BUILTIN_POLICIES[kind] then
    read_fields(p, BUILTIN_POLICIES[kind], 'BANBUS_CONFIG', kind, cfg)
  else
    return nil
  end
  check_policy(p, 'BANBUS_CONFIG', kind)
  return p
end

local function known_kinds(ns)
  local kinds = {}
  for name in pairs(BUILTIN_POLICIES) do kinds[name] = true end
  for _, name in ipairs(redis.call('HKEYS', key(ns, 'policies'))) do kinds[name] = true end
  local sorted = {}
  for name in pairs(kinds) do sorted[#sorted + 1] = name end
  table.sort(sorted)
  return sorted
end

-- Attacker-controlled text (a request path, a user name) in a reason: control
-- characters, C1 controls and bidi overrides become '?', invalid UTF-8 is
-- dropped to ASCII, and the result is cut at a character boundary.
local function sanitise(text, limit)
  local s = string.sub(text, 1, limit * 4)
  s = string.gsub(s, '[%z\1-\31\127]', '?')
  for _, pattern in ipairs(INVISIBLE) do
    s = string.gsub(s, pattern, '?')
  end
  s = string.gsub(s, '\226\128[\142\143]', '?')     -- U+200E, U+200F
  s = string.gsub(s, '\216\156', '?')               -- U+061C
  if not valid_utf8(s) then
    s = string.gsub(s, '[\128-\255]', '?')
  end
  if #s > limit then
    local cut = limit
    while cut > 0 do
      local b = string.byte(s, cut + 1)
      if b < 128 or b >= 192 then break end
      cut = cut - 1
    end
    s = string.sub(s, 1, cut)
  end
  return s
end

local function duration(seconds)
  local units = {{86400, 'd'}, {3600, 'h'}, {60, 'm'}}
  for _, u in ipairs(units) do
    if seconds >= u[1] and seconds % u[1] == 0 then
      return fmt(seconds / u[1]) .. u[2]
    end
  end
  return fmt(seconds) .. 's'
end

-- The live entry of `table_name` equal to the network of `groups`/`plen` or
-- wider, or nil.  (One HMGET of every prefix: crossings only.)
local function covering(ns, table_name, version, groups, plen, now)
  local width = version == 4 and 32 or 16
  local fields = {}
  for p = plen, 1, -1 do
    fields[#fields + 1] = format_net(version, mask_groups(groups, p, width), p)
  end
  local values = redis.call('HMGET', key(ns, table_name), unpack(fields))
  for i = 1, #fields do
    if values[i] then
      local e = record_expires(values[i])
      if e and (e == 0 or e > now) then return fields[i] end
    end
  end
  return nil
end

local function address_groups(address)
  local v4 = parse_v4(address)
  if v4 then return 4, {v4}, 32 end
  return 6, parse_v6(address), 128
end

local function report(keys, args)
  local usage = 'FCALL banbus_report 1 <namespace> <ip> <kind> [weight] [ORIGIN <name>] '
    .. '[DETAIL <text>]'
  local ns = namespace(keys, usage)
  if #args < 2 then
    fail('BANBUS_INVALID', 'usage: ' .. usage)
  end
  local kind = args[2]
  check_kind(kind)
  local weight, i = 1, 3
  if args[3] ~= nil and string.find(args[3], '^%d') then
    weight = policy_value('BANBUS_INVALID', kind, 'weight', args[3], nil)
    i = 4
  end
  local origin, detail = 'fcall', ''
  local seen = {}
  while i <= #args do
    local word = string.upper(string.sub(args[i], 1, 16))
    local value = args[i + 1]
    if (word ~= 'ORIGIN' and word ~= 'DETAIL') or seen[word] then
      fail('BANBUS_INVALID', 'option ' .. describe(args[i]) .. ' is unknown to banbus_report '
        .. 'or given twice; expected ORIGIN <name> or DETAIL <text>')
    end
    if value == nil then
      fail('BANBUS_INVALID', 'option ' .. word .. ' needs a value')
    end
    seen[word] = true
    if word == 'ORIGIN' then
      check_name('origin', value, MAX_ORIGIN)
      origin = value
    else
      detail = sanitise(value, MAX_DETAIL)
    end
    i = i + 2
  end
  local cfg = read_config(ns)
  local address = canonical_target(args[1], 0, 0, true)
  if string.find(address, '/', 1, true) then
    fail('BANBUS_INVALID', 'target ' .. describe(address)
      .. ' is a network; report the address that offended')
  end
  local p = stored_policy(ns, kind, cfg)
  if not p then
    fail('BANBUS_INVALID', 'kind ' .. describe(kind) .. ' has no policy (known: '
      .. table.concat(known_kinds(ns), ', ') .. '); set one with banbus policy set')
  end
  local version, groups, maxlen = address_groups(address)
  local plen = version == 4 and p.ipv4_prefix or p.ipv6_prefix
  local network = mask_groups(groups, plen, version == 4 and 32 or 16)
  local target = format_net(version, network, plen)
  local okey = key(ns, 'offenses:' .. kind .. ':' .. target)
  local skey = key(ns, 'strikes:' .. kind .. ':' .. target)
  settled(ns, okey, skey, key(ns, 'policies'), key(ns, 'shadow'))

  -- The sliding window: the times of the last `threshold` offenses, in a
  -- string that expires with the window.
  local now, time = now_ms()
  local window_ms = p.window * 1000
  local since = now - window_ms
  local kept = {}
  local old = redis.pcall('GET', okey)
  if type(old) == 'string' then
    for t in string.gmatch(string.sub(old, 1, 16 * MAX_THRESHOLD), '%d+') do
      local v = tonumber(t)
      if v > since and v <= now then kept[#kept + 1] = v end
    end
  end
  for _ = 1, math.min(weight, p.threshold) do
    kept[#kept + 1] = now
  end
  -- Only the newest `threshold` offenses can matter.
  if #kept > p.threshold then
    local newest = {}
    for k = #kept - p.threshold + 1, #kept do newest[#newest + 1] = kept[k] end
    kept = newest
  end
  local count = #kept
  if count < p.threshold then
    local parts = {}
    for k = 1, count do parts[k] = fmt(kept[k]) end
    redis.call('SET', okey, table.concat(parts, ','), 'PX', fmt(window_ms))
    return {'counted', count, p.threshold, target, 0, '', 0, 0, p.window, 0, ''}
  end
  -- Crossed: the window starts afresh whatever happens next, so of any
  -- number of racing reports exactly one crosses.
  redis.call('DEL', okey)
  -- The allowlist beats every ban (one HLEN when it is empty).
  if redis.call('HLEN', key(ns, 'allow')) > 0
      and covering(ns, 'allow', version, groups, maxlen, now) then
    return {'allowed', count, p.threshold, target, 0, '', 0, 0, p.window, 0, ''}
  end
  -- Banned already (nodes do not even send these; redis-cli may).  A wider
  -- ban covering the target would make the new one redundant, not wrong.
  local current = redis.call('HGET', key(ns, 'bans'), target)
  local current_exp = current and record_expires(current)
  if current_exp and (current_exp == 0 or current_exp > now) then
    return {'already', count, p.threshold, target, 0, '', 0, 0, p.window, 0, ''}
  end
  local strikes = tonumber(redis.call('GET', skey) or '0') or 0
  strikes = strikes + 1
  local ttl = p.ttl
  if ttl > 0 then
    for _ = 2, strikes do
      ttl = ttl * p.escalate
      if ttl >= p.max_ttl then break end
    end
    ttl = math.min(math.floor(ttl), p.max_ttl)
  end
  local reason = kind .. ': ' .. fmt(count) .. ' in ' .. duration(p.window)
  if strikes > 1 then reason = reason .. ', strike ' .. fmt(strikes) end
  if detail ~= '' then reason = reason .. ' (' .. detail .. ')' end
  if p.shadow == 1 then
    -- Shadow mode: nothing is banned; the stream carries a notice (no seq:
    -- it changes nothing, and nodes of any version skip it).
    local id = xadd(ns, cfg.maxlen, now, {'op', 'would_ban', 'target', target,
      'kind', kind, 'ttl', fmt(ttl), 'reason', reason, 'origin', origin})
    if type(id) == 'table' then return id end
    redis.call('HINCRBY', key(ns, 'shadow'), kind, 1)
    return {'shadow', count, p.threshold, target, 0, id, 0, strikes, p.window, ttl, reason}
  end
  local reply = store(ns, OPS.banbus_ban, cfg, target, ttl, reason,
    {replace = false, origin = origin, status = true}, now, time, 'written')
  if reply.err then return reply end
  if ttl + p.forget > 0 then
    redis.call('SET', skey, fmt(strikes), 'PX', fmt((ttl + p.forget) * 1000))
  else
    redis.call('DEL', skey)  -- permanent and nothing to remember: no strikes kept
  end
  return {'banned', count, p.threshold, target, reply[1], reply[2], reply[4], strikes, p.window,
    ttl, reason}
end

local function policy(keys, args)
  local usage = 'FCALL banbus_policy 1 <namespace> SET <kind> [THRESHOLD n] [WINDOW s] [TTL s] '
    .. '[ESCALATE x] [MAX_TTL s] [FORGET s] [IPV4_PREFIX n] [IPV6_PREFIX n] [SHADOW 0|1]'
    .. ' | DELETE <kind>'
  local ns = namespace(keys, usage)
  local action = string.upper(string.sub(args[1] or '', 1, 16))
  local kind = args[2]
  if (action ~= 'SET' and action ~= 'DELETE') or kind == nil then
    fail('BANBUS_INVALID', 'usage: ' .. usage)
  end
  check_kind(kind)
  local pkey = key(ns, 'policies')
  settled(ns, pkey)
  if action == 'DELETE' then
    if #args > 2 then fail('BANBUS_INVALID', 'usage: ' .. usage) end
    return redis.call('HDEL', pkey, kind)
  end
  local cfg = read_config(ns)
  local exists = redis.call('HEXISTS', pkey, kind) == 1
  local p
  if exists or BUILTIN_POLICIES[kind] then
    local ok, current = pcall(stored_policy, ns, kind, cfg)
    if ok then p = current else p = {} ; read_fields(p, POLICY_DEFAULTS, 'BANBUS_CONFIG', kind, cfg) end
  else
    if redis.call('HLEN', pkey) >= MAX_KINDS then
      fail('BANBUS_INVALID', 'kind: there are already ' .. MAX_KINDS .. ' policies; delete one first')
    end
    p = {}
    read_fields(p, POLICY_DEFAULTS, 'BANBUS_CONFIG', kind, cfg)
  end
  local given = {}
  local n = 3
  while n <= #args do
    local name = string.lower(string.sub(args[n], 1, 16))
    local value = args[n + 1]
    if value == nil then
      fail('BANBUS_INVALID', 'option ' .. string.upper(name) .. ' needs a value')
    end
    if given[name] then
      fail('BANBUS_INVALID', 'option ' .. string.upper(name) .. ' is given twice')
    end
    given[name] = true
    p[name] = policy_value('BANBUS_INVALID', kind, name, value, cfg)
    n = n + 2
  end
  check_policy(p, 'BANBUS_INVALID', kind)
  local text = format_policy(p)
  redis.call('HSET', pkey, kind, text)
  return {kind, text}
end

local function policies(keys, args)
  local ns = namespace(keys, 'FCALL_RO banbus_policies 1 <namespace>')
  local cfg = read_config(ns)
  local out = {}
  local counts = redis.call('HGETALL', key(ns, 'shadow'))
  local shadowed = {}
  for k = 1, #counts, 2 do shadowed[counts[k]] = counts[k + 1] end
  for _, kind in ipairs(known_kinds(ns)) do
    local stored = redis.call('HGET', key(ns, 'policies'), kind)
    local ok, p = pcall(stored_policy, ns, kind, cfg)
    local text, source
    if ok then
      text, source = format_policy(p), stored and 'set' or 'default'
    else
      text = stored or ''
      source = 'invalid: ' .. (type(p) == 'table' and p.banbus_error or tostring(p))
    end
    out[#out + 1] = {kind, text, source, tonumber(shadowed[kind] or '0') or 0}
  end
  return out
end

local function clear(keys, args)
  local usage = 'FCALL banbus_clear 1 <namespace> [ORIGIN <name>] [EID <id>] [RETRY <ms>]'
  local ns = namespace(keys, usage)
  settled(ns)
  local opts = parse_options(args, 1, 'clear', 'banbus_clear')
  local cfg = read_config(ns)
  local now, time = now_ms()
  if opts.retry then
    local entry = find_event(ns, opts.eid, opts.retry)
    if entry then return duplicate_reply(ns, entry, '') end
  end
  local epoch = ensure_epoch(ns, time)
  local seq = redis.call('INCR', key(ns, 'seq'))
  local eid = opts.eid or (epoch .. '-' .. fmt(seq))
  local id = xadd(ns, cfg.maxlen, now, {'op', 'clear', 'origin', opts.origin, 'eid', eid,
    'seq', fmt(seq)})
  if type(id) == 'table' then
    redis.call('DECR', key(ns, 'seq'))
    return id
  end
  redis.call('DEL', key(ns, 'bans'), key(ns, 'bans:exp'), key(ns, 'allow'), key(ns, 'allow:exp'),
    key(ns, 'removed'))
  remember_removal(ns, '*', now)
  redis.call('HSET', key(ns, 'head'), 'id', id, 'd1', 0, 'd2', 0)
  if opts.status then
    return {seq, id, '', 0, 'written', epoch}
  end
  return {seq, id, '', 0}
end

local function repair(keys, args)
  local ns = namespace(keys, 'FCALL banbus_repair 1 <namespace>')
  settled(ns)
  if #args > 0 then
    fail('BANBUS_INVALID', 'usage: FCALL banbus_repair 1 <namespace>')
  end
  local now = now_ms()
  local fixed = repair_stream(ns, now)
  local v = redis.call('HMGET', key(ns, 'head'), 'd1', 'd2')
  local before = v[1] and v[2] and (fmt(tonumber(v[1]) % P1) .. ' ' .. fmt(tonumber(v[2]) % P2))
    or 'none'
  local sums = rehash(ns)
  return {fixed, before, fmt(sums[1] % P1) .. ' ' .. fmt(sums[2] % P2)}
end

-- ---------------------------------------------------------------------------
-- Reads
-- ---------------------------------------------------------------------------

-- The last event this library wrote: {id, seq} (its seq is the counter's:
-- both move in the same call).  Namespaces written by library v3 have no
-- head yet: the newest entry stands in.
local function head_of(ns)
  local id = redis.call('HGET', key(ns, 'head'), 'id')
  local counter = tonumber(redis.call('GET', key(ns, 'seq')) or '0') or 0
  if id then return id, counter end
  local newest = redis.call('XREVRANGE', key(ns, 'log'), '+', '-', 'COUNT', '1')
  if newest[1] then
    return newest[1][1], tonumber(field_of(newest[1][2], 'seq') or '') or counter
  end
  return '0-0', counter
end

local function state(keys, args)
  local ns = namespace(keys, 'FCALL_RO banbus_state 1 <namespace>')
  if #args > 0 then
    fail('BANBUS_INVALID', 'usage: FCALL_RO banbus_state 1 <namespace>')
  end
  -- The head's id and seq are the bootstrap watermark; both come from one
  -- atomic read.
  local last_id, seq = head_of(ns)
  local epoch = redis.call('GET', key(ns, 'epoch')) or ''
  local now = now_ms()
  return {last_id, seq, epoch, now, VERSION}
end

local function digest(keys, args)
  local usage = 'FCALL_RO banbus_digest 1 <namespace> <cutoff_ms>'
  local ns = namespace(keys, usage)
  if #args ~= 1 then
    fail('BANBUS_INVALID', 'usage: ' .. usage)
  end
  local cutoff = parse_ms('cutoff', args[1])
  local last_id, seq = head_of(ns)
  local v = redis.call('HMGET', key(ns, 'head'), 'd1', 'd2')
  if not (v[1] and v[2]) then
    return {seq, last_id, 'unknown', 0, 0, 0}
  end
  local dg = {tonumber(v[1]) % P1, tonumber(v[2]) % P2,
    redis.call('HLEN', key(ns, 'bans')) + redis.call('HLEN', key(ns, 'allow'))}
  local c = fmt(cutoff)
  for _, t in ipairs(TABLES) do
    local zkey = key(ns, t[2] .. ':exp')
    if redis.call('ZCOUNT', zkey, '-inf', c) > DIGEST_EXCLUDE_LIMIT then
      return {seq, last_id, 'busy', 0, 0, 0}
    end
    -- Entries that expire before the cutoff are left out (the node does the
    -- same), whether or not a purge has removed them yet.
    local due = redis.call('ZRANGEBYSCORE', zkey, '-inf', c, 'WITHSCORES')
    for i = 1, #due, 2 do
      local h1, h2 = entry_hash(t[1], due[i], tonumber(due[i + 1]))
      dg[1] = (dg[1] - h1) % P1
      dg[2] = (dg[2] - h2) % P2
      dg[3] = dg[3] - 1
    end
  end
  return {seq, last_id, 'ok', dg[1], dg[2], dg[3]}
end

local function check(keys, args)
  local usage = 'FCALL_RO banbus_check 1 <namespace> <target> [FORCE]'
  local ns = namespace(keys, usage)
  if #args < 1 or #args > 2 then
    fail('BANBUS_INVALID', 'usage: ' .. usage)
  end
  local force = false
  if args[2] ~= nil then
    if string.upper(string.sub(args[2], 1, 16)) ~= 'FORCE' then
      fail('BANBUS_INVALID', 'option ' .. describe(args[2])
        .. ' is unknown to banbus_check; expected FORCE')
    end
    force = true
  end
  local cfg = read_config(ns)
  return canonical_target(args[1], cfg.min_v4, cfg.min_v6, force)
end

-- Turn validation failures into error replies; anything else (a Redis error
-- from redis.call, a bug) propagates as is.
local function entry(impl)
  return function(keys, args)
    local ok, result = pcall(impl, keys, args)
    if ok then
      return result
    end
    if type(result) == 'table' and result.banbus_error then
      return redis.error_reply(result.banbus_error)
    end
    error(result, 0)
  end
end

-- Only `redis` is reachable while a library loads (Redis 7.0: not even
-- `string` or `pairs`), hence no loop here and no library aliases at the top.
local function register_write(fname)
  redis.register_function{
    function_name = fname,
    callback = entry(function(keys, args) return write(fname, keys, args) end),
  }
end

register_write('banbus_ban')
register_write('banbus_allow')
register_write('banbus_unban')
register_write('banbus_disallow')

redis.register_function{
  function_name = 'banbus_clear',
  callback = entry(clear),
}

redis.register_function{
  function_name = 'banbus_report',
  callback = entry(report),
}

redis.register_function{
  function_name = 'banbus_policy',
  callback = entry(policy),
}

redis.register_function{
  function_name = 'banbus_policies',
  callback = entry(policies),
  flags = {'no-writes'},
}

redis.register_function{
  function_name = 'banbus_repair',
  callback = entry(repair),
}

redis.register_function{
  function_name = 'banbus_state',
  callback = entry(state),
  flags = {'no-writes'},
}

redis.register_function{
  function_name = 'banbus_digest',
  callback = entry(digest),
  flags = {'no-writes'},
}

redis.register_function{
  function_name = 'banbus_check',
  callback = entry(check),
  flags = {'no-writes'},
}

redis.register_function{
  function_name = 'banbus_version',
  callback = function() return VERSION end,
  flags = {'no-writes'},
}
