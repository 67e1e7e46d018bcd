// sum_over_lanes for attention.wgsl on adapters whose subgroups hold a whole slot:
// the step's partial dots sc[0 .. KB * ROWS) are summed over the KT lanes of each
// slot by butterfly shuffles, leaving the totals in every lane. A slot's lanes are
// KT consecutive invocations starting at a multiple of KT, and subgroups are
// consecutive runs of a power-of-two size >= KT (src/wgpu/attention.rs checks the
// adapter's smallest subgroup), so a slot never straddles two subgroups.

fn sum_over_lanes(lid: u32) {
    for (var i = 0u; i < KB * ROWS; i++) {
        var s = sc[i];
        for (var mask = KT / 2u; mask > 0u; mask >>= 1u) {
            s += subgroupShuffleXor(s, mask);
        }
        sc[i] = s;
    }
}
