// MoE routing's selection (model/moe.py's Router), shared by cpu_kernels.c and cpu_kernels_fp32.c: given one
// token's sigmoid scores s [E] and the correction bias [E], the choice uses s + bias: with n_group > 1 each group is
// scored by the sum of its top two and only the best topk_group groups stay; then the k best experts, best first
// (ties to the lower id); their weights are the unbiased s, normalised to sum 1 when norm, times scaling.
// -> idx [k], w [k]. E <= 1024.
#include <math.h>
#include <stdint.h>

static void route_select(const float *s, const float *bias, int64_t E, int64_t n_group, int64_t topk_group,
                         int64_t k, int norm, float scaling, int64_t *idx, float *w) {
    float choice[1024];
    for (int64_t e = 0; e < E; e++) choice[e] = s[e] + bias[e];
    if (n_group > 1) {
        const int64_t per = E / n_group;
        float gscore[1024];
        for (int64_t g = 0; g < n_group; g++) {
            float a = -INFINITY, b = -INFINITY;  // the group's two largest
            for (int64_t e = g * per; e < (g + 1) * per; e++) {
                if (choice[e] > a) { b = a; a = choice[e]; } else if (choice[e] > b) b = choice[e];
            }
            gscore[g] = a + b;
        }
        for (int64_t t = 0; t < n_group - topk_group; t++) {  // drop the worst groups, one at a time
            int64_t worst = -1;
            for (int64_t g = 0; g < n_group; g++)
                if (gscore[g] != INFINITY && (worst < 0 || gscore[g] < gscore[worst])) worst = g;
            gscore[worst] = INFINITY;  // marks it dropped
            for (int64_t e = worst * per; e < (worst + 1) * per; e++) choice[e] = -INFINITY;
        }
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (choice[e] != -INFINITY && (best < 0 || choice[e] > choice[best])) best = e;
        if (best < 0) best = 0;
        idx[j] = best;
        w[j] = s[best];
        sum += s[best];
        choice[best] = -INFINITY;
    }
    for (int64_t j = 0; j < k; j++) w[j] = (norm ? w[j] / (sum + 1e-20f) : w[j]) * scaling;
}
