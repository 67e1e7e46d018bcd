// sum_over_lanes for attention.wgsl on adapters without subgroups (or with
// subgroups narrower than a slot): the step's partial dots sc[0 .. KB * ROWS) are
// summed over the KT lanes of each slot through workgroup memory, and every lane
// gets the totals. Partial i of invocation lid sits at i * (WG + 1) + lid, so both
// the writes and each lane's column sum touch 32 consecutive banks; a slot's
// totals are 17 apart from the next slot's for the same reason.

const LANE_SUM_ROW: u32 = 65u;     // WG + 1
const LANE_SUM_TOTALS: u32 = 1040u; // after 16 rows of partials: 16 totals per slot, 17 apart

fn sum_over_lanes(lid: u32) {
    let n = KB * ROWS;
    for (var i = 0u; i < n; i++) {
        q_sh[i * LANE_SUM_ROW + lid] = sc[i];
    }
    workgroupBarrier();
    let first = lid - lid % KT;
    for (var i = lid % KT; i < n; i += KT) {
        var s = 0.0;
        for (var x = 0u; x < KT; x++) {
            s += q_sh[i * LANE_SUM_ROW + first + x];
        }
        q_sh[LANE_SUM_TOTALS + (lid / KT) * 17u + i] = s;
    }
    workgroupBarrier();
    for (var i = 0u; i < n; i++) {
        sc[i] = q_sh[LANE_SUM_TOTALS + (lid / KT) * 17u + i];
    }
}
