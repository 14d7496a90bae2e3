-- uses: start, feed
-- A worker's start and the FEED that refills the rq queue behind the job it took.
-- KEYS: start's three, feed's two. ARGV: feed depth, then start's.
local res = start({KEYS[1], KEYS[2], KEYS[3]}, {unpack(ARGV, 2)})
feed({KEYS[4], KEYS[5]}, {ARGV[1]})
return res
