"""Lua scripts of the Redis store: each is one atomic round trip.

The scripts build block keys from a prefix and the hashes they are given or
read, which a standalone Redis (or a primary with replicas) allows and Redis
Cluster does not; the chart deploys a standalone Redis.
"""

# Renews a registration only if it still exists, so a lapsed worker learns it
# must register again instead of resurrecting a registration without its blocks.
# KEYS[1]: the worker's registration hash. ARGV[1]: its load (JSON).
HEARTBEAT = """
local ttl_ms = redis.call('HGET', KEYS[1], 'ttl_ms')
if not ttl_ms then return 0 end
redis.call('HSET', KEYS[1], 'load', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return 1
"""

# Longest prefix per worker, in one round trip. ARGV[1]: the block key prefix;
# ARGV[2]: the worker block-set key prefix; ARGV[3]: the prompt's block hashes
# concatenated (16 bytes each, in prompt order); ARGV[4..]: candidate worker ids.
# Returns, in candidate order, the number of leading blocks each holds.
#
# Who holds the first block comes from its block hash (one HMGET over every
# candidate); a miss there, the common case for a new prompt, ends the lookup.
# Each worker that holds it then checks the following blocks against its own
# block set with SMISMEMBER, in chunks that double (32, 64, ...) and stop at its
# first missing block. A redis.call per block would cost ~2 us each in Lua
# (~300 us for a 2k-token prompt); a few calls per holder cost far less.
# The hashes travel as one argument: packing 128 separate arguments in the
# client costs more than the lookup.
MATCH_PREFIX = """
local block_prefix, set_prefix, blob = ARGV[1], ARGV[2], ARGV[3]
local num_blocks = #blob / 16
local workers, num_matched = {}, {}
for j = 4, #ARGV do
  workers[#workers + 1] = ARGV[j]
  num_matched[#num_matched + 1] = 0
end
if num_blocks == 0 or #workers == 0 then return num_matched end
local held = redis.call('HMGET', block_prefix .. string.sub(blob, 1, 16), unpack(workers))
local hashes = nil
for j = 1, #workers do
  if held[j] then
    if hashes == nil then
      hashes = {}
      for i = 1, num_blocks do hashes[i] = string.sub(blob, 16 * i - 15, 16 * i) end
    end
    local n, chunk = 1, 32
    while n < num_blocks do
      local last = math.min(n + chunk, num_blocks)
      local flags = redis.call('SMISMEMBER', set_prefix .. workers[j], unpack(hashes, n + 1, last))
      local k = 1
      while k <= #flags and flags[k] == 1 do k = k + 1 end
      n = n + k - 1
      if k <= #flags then break end
      chunk = math.min(chunk * 2, 4096)
    end
    num_matched[j] = n
  end
end
return num_matched
"""

# Drops up to ARGV[3] of a worker's index entries per call; callers loop until
# it returns 0, so a worker with many blocks never blocks Redis for long.
# KEYS[1]: the worker's registration, KEYS[2]: the set of block hashes it holds,
# KEYS[3]: the set of known worker ids.
# ARGV[1]: worker_id, ARGV[2]: block key prefix, ARGV[3]: batch size,
# ARGV[4]: 'lapsed' to reap only while the registration is gone (returns -1,
# touching nothing, once the worker has registered again), 'owner' otherwise.
CLEAR_BLOCKS = """
if ARGV[4] == 'lapsed' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local block_hashes = redis.call('SPOP', KEYS[2], tonumber(ARGV[3]))
for _, block_hash in ipairs(block_hashes) do
  redis.call('HDEL', ARGV[2] .. block_hash, ARGV[1])
end
local left = redis.call('SCARD', KEYS[2])
if left == 0 and ARGV[4] == 'lapsed' then redis.call('SREM', KEYS[3], ARGV[1]) end
return left
"""
